//! The queue behind a batcher: buckets of priority levels of FIFO entries,
//! a deadline heap, and the rules that cut a batch. No threads here; every
//! method runs under the batcher's one lock.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{BatcherConfig, WeightMode};
use crate::ticket::{Slot, BATCHED, EXPIRED, FAILED, QUEUED};

/// One queued request. Entries whose slot left `QUEUED` (cancelled,
/// expired) stay behind as tombstones until they reach the front or the
/// level is compacted.
struct Entry<I, O, E> {
    item: I,
    slot: Arc<Slot<O, E>>,
}

struct Level<I, O, E> {
    deque: VecDeque<Entry<I, O, E>>,
    live: usize,
}

impl<I, O, E> Level<I, O, E> {
    /// Drops tombstones at the front; returns the live head.
    fn head(&mut self) -> Option<&Entry<I, O, E>> {
        while self.deque.front().is_some_and(|e| e.slot.state() != QUEUED) {
            self.deque.pop_front();
        }
        self.deque.front()
    }

    fn compact_if_sparse(&mut self) {
        if self.deque.len() > 2 * self.live + 32 {
            self.deque.retain(|e| e.slot.state() == QUEUED);
        }
    }
}

/// Counts of one class (user levels, or warm-up) within a bucket.
#[derive(Default, Clone, Copy)]
struct ClassCount {
    live: usize,
    weight: u64,
    /// The heaviest weight pushed since the class was last empty: an upper
    /// bound of the heaviest live item, used to tell when a padded batch is
    /// full.
    max_hint: u64,
}

struct Bucket<I, O, E> {
    /// Level number → level; iterated highest first.
    levels: BTreeMap<u8, Level<I, O, E>>,
    user: ClassCount,
    warm: ClassCount,
}

impl<I, O, E> Bucket<I, O, E> {
    fn class(&mut self, warm: bool) -> &mut ClassCount {
        if warm {
            &mut self.warm
        } else {
            &mut self.user
        }
    }

    /// Accounts for one live entry of `level` leaving the queue.
    fn remove(&mut self, level: u8, weight: u64) {
        let c = self.class(level == 0);
        c.live -= 1;
        c.weight -= weight;
        if c.live == 0 {
            c.max_hint = 0;
        }
        if let Some(l) = self.levels.get_mut(&level) {
            l.live -= 1;
        }
    }

    fn live(&self) -> usize {
        self.user.live + self.warm.live
    }
}

/// An entry in the deadline heap, ordered earliest first.
struct Due<O, E> {
    at: Instant,
    slot: Arc<Slot<O, E>>,
}

impl<O, E> PartialEq for Due<O, E> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<O, E> Eq for Due<O, E> {}
impl<O, E> PartialOrd for Due<O, E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<O, E> Ord for Due<O, E> {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse so the earliest is on top.
        (Reverse(self.at), Reverse(self.slot.id)).cmp(&(Reverse(other.at), Reverse(other.slot.id)))
    }
}

/// A batch taken out of the queue.
pub(crate) struct Cut<I, O, E> {
    pub(crate) id: u64,
    pub(crate) items: Vec<I>,
    pub(crate) slots: Vec<Arc<Slot<O, E>>>,
    pub(crate) weight: u64,
    pub(crate) padded_weight: u64,
    pub(crate) total_queue_time: Duration,
    pub(crate) max_queue_time: Duration,
}

/// Counters kept under the queue lock.
pub(crate) struct Counters {
    pub(crate) submitted: u64,
    pub(crate) rejected: u64,
    pub(crate) timed_out: u64,
    pub(crate) cancelled: u64,
    pub(crate) failed_on_shutdown: u64,
    pub(crate) batches: u64,
    pub(crate) items_batched: u64,
    /// Batch sizes by power of two: index k counts sizes in (2^(k-1), 2^k].
    pub(crate) size_histogram: [u64; 21],
    pub(crate) real_weight: u128,
    pub(crate) padded_weight: u128,
    /// Recent queue times in nanoseconds (a ring).
    pub(crate) queue_times: Vec<u64>,
    pub(crate) queue_times_next: usize,
    window: usize,
}

impl Counters {
    fn new(window: usize) -> Self {
        Self {
            submitted: 0,
            rejected: 0,
            timed_out: 0,
            cancelled: 0,
            failed_on_shutdown: 0,
            batches: 0,
            items_batched: 0,
            size_histogram: [0; 21],
            real_weight: 0,
            padded_weight: 0,
            queue_times: Vec::with_capacity(window.min(1 << 16)),
            queue_times_next: 0,
            window,
        }
    }

    fn record_queue_time(&mut self, d: Duration) {
        if self.window == 0 {
            return;
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if self.queue_times.len() < self.window {
            self.queue_times.push(ns);
        } else {
            self.queue_times[self.queue_times_next] = ns;
            self.queue_times_next = (self.queue_times_next + 1) % self.window;
        }
    }

    fn record_batch(&mut self, size: usize, real: u64, padded: u64) {
        self.batches += 1;
        self.items_batched += size as u64;
        let k = (usize::BITS - (size.max(1) - 1).leading_zeros()) as usize;
        self.size_histogram[k.min(20)] += 1;
        self.real_weight += u128::from(real);
        self.padded_weight += u128::from(padded);
    }
}

/// What `push` tells the caller to wake.
pub(crate) struct Wake {
    pub(crate) worker: bool,
    pub(crate) reaper: bool,
}

pub(crate) struct Queue<I, O, E> {
    buckets: HashMap<u64, Bucket<I, O, E>>,
    /// Live requests and their weight, all classes.
    pub(crate) live: usize,
    pub(crate) weight: u64,
    /// Live warm-up requests.
    warm_live: usize,
    deadlines: BinaryHeap<Due<O, E>>,
    pub(crate) next_id: u64,
    next_batch: u64,
    pub(crate) closed: bool,
    pub(crate) reaper_stop: bool,
    pub(crate) max_batch_weight: u64,
    pub(crate) counters: Counters,
}

/// Effective priority: the level plus one per full `aging` waited; warm-up
/// (level 0) never ages. Ties go to the older request.
fn rank(
    level: u8,
    enqueued: Instant,
    id: u64,
    now: Instant,
    aging: Duration,
) -> (u64, Reverse<u64>) {
    let mut p = u64::from(level);
    if level != 0 && !aging.is_zero() {
        let waited = now.saturating_duration_since(enqueued).as_nanos();
        let steps = waited / aging.as_nanos();
        p += u64::try_from(steps)
            .unwrap_or(u64::MAX / 2)
            .min(u64::MAX / 2);
    }
    (p, Reverse(id))
}

fn fits(mode: WeightMode, limit: u64, n: usize, weight: u64, max_w: u64, w: u64) -> bool {
    if n == 0 {
        return true;
    }
    match mode {
        WeightMode::Sum => weight.saturating_add(w) <= limit,
        WeightMode::Padded => max_w.max(w).saturating_mul(n as u64 + 1) <= limit,
    }
}

impl<I, O, E> Queue<I, O, E> {
    pub(crate) fn new(cfg: &BatcherConfig) -> Self {
        Self {
            buckets: HashMap::new(),
            live: 0,
            weight: 0,
            warm_live: 0,
            deadlines: BinaryHeap::new(),
            next_id: 0,
            next_batch: 0,
            closed: false,
            reaper_stop: false,
            max_batch_weight: cfg.max_batch_weight,
            counters: Counters::new(cfg.stats_window),
        }
    }

    /// Adds a request. The caller has checked the limits.
    pub(crate) fn push(&mut self, item: I, slot: Arc<Slot<O, E>>, cfg: &BatcherConfig) -> Wake {
        let was_empty = self.live == 0;
        let warm = slot.level == 0;
        let mut reaper = false;
        if let Some(at) = slot.deadline {
            reaper = self.deadlines.peek().is_none_or(|d| at < d.at);
            self.deadlines.push(Due {
                at,
                slot: Arc::clone(&slot),
            });
            if self.deadlines.len() > 2 * self.live + 1024 {
                self.deadlines.retain(|d| d.slot.state() == QUEUED);
            }
        }
        self.live += 1;
        self.weight += slot.weight;
        self.counters.submitted += 1;
        if warm {
            self.warm_live += 1;
        }
        let bucket = self.buckets.entry(slot.bucket).or_insert_with(|| Bucket {
            levels: BTreeMap::new(),
            user: ClassCount::default(),
            warm: ClassCount::default(),
        });
        let c = bucket.class(warm);
        c.live += 1;
        c.weight += slot.weight;
        c.max_hint = c.max_hint.max(slot.weight);
        let full = c.live >= cfg.max_batch_size
            || match cfg.weight_mode {
                WeightMode::Sum => c.weight >= self.max_batch_weight,
                WeightMode::Padded => {
                    c.max_hint.saturating_mul(c.live as u64) >= self.max_batch_weight
                }
            };
        let level = bucket.levels.entry(slot.level).or_insert_with(|| Level {
            deque: VecDeque::new(),
            live: 0,
        });
        level.live += 1;
        level.deque.push_back(Entry { item, slot });
        Wake {
            worker: was_empty || full || cfg.max_delay.is_zero() || self.closed,
            reaper,
        }
    }

    /// Accounts for a queued slot leaving by cancellation, expiry or
    /// failure; the caller has already moved its state out of `QUEUED`.
    fn forget(&mut self, slot: &Slot<O, E>) {
        self.live -= 1;
        self.weight -= slot.weight;
        if slot.level == 0 {
            self.warm_live -= 1;
        }
        let mut drop_bucket = false;
        if let Some(b) = self.buckets.get_mut(&slot.bucket) {
            b.remove(slot.level, slot.weight);
            if b.live() == 0 {
                drop_bucket = true;
            } else if let Some(l) = b.levels.get_mut(&slot.level) {
                l.compact_if_sparse();
                if l.deque.is_empty() {
                    b.levels.remove(&slot.level);
                }
            }
        }
        if drop_bucket {
            self.buckets.remove(&slot.bucket);
        }
    }

    /// Removes a queued request (cancellation). False if it was not queued.
    pub(crate) fn cancel(&mut self, slot: &Slot<O, E>) -> bool {
        if slot.state() != QUEUED {
            return false;
        }
        slot.set_state(crate::ticket::CANCELLED);
        self.forget(slot);
        self.counters.cancelled += 1;
        true
    }

    fn expire(&mut self, slot: &Arc<Slot<O, E>>, out: &mut Vec<Arc<Slot<O, E>>>) {
        slot.set_state(EXPIRED);
        self.forget(slot);
        self.counters.timed_out += 1;
        out.push(Arc::clone(slot));
    }

    /// Expires every queued request whose deadline is at or before `now`
    /// into `out`; returns the next deadline still pending.
    pub(crate) fn expire_due(
        &mut self,
        now: Instant,
        out: &mut Vec<Arc<Slot<O, E>>>,
    ) -> Option<Instant> {
        while let Some(d) = self.deadlines.peek() {
            if d.slot.state() != QUEUED {
                self.deadlines.pop();
                continue;
            }
            if d.at > now {
                return Some(d.at);
            }
            let d = self.deadlines.pop().expect("peeked");
            self.expire(&d.slot, out);
        }
        None
    }

    /// Fails every queued request into `out` (shutdown in fail mode).
    pub(crate) fn fail_all(&mut self, out: &mut Vec<Arc<Slot<O, E>>>) {
        for (_, b) in self.buckets.drain() {
            for (_, l) in b.levels {
                for e in l.deque {
                    if e.slot.state() == QUEUED {
                        e.slot.set_state(FAILED);
                        out.push(e.slot);
                    }
                }
            }
        }
        self.counters.failed_on_shutdown += out.len() as u64;
        self.deadlines.clear();
        self.live = 0;
        self.weight = 0;
        self.warm_live = 0;
    }

    /// Cuts the next batch if one is ready. Requests found past their
    /// deadline on the way are expired into `expired`. Returns `Err(next)`
    /// when nothing is ready, where `next` is when the earliest bucket will
    /// be ready by `max_delay` (`None`: nothing queued). `idle`: no batch is
    /// in flight, so (unless `cfg.wait_when_idle`) the best bucket is cut at
    /// once instead of waiting for `max_delay`.
    pub(crate) fn cut(
        &mut self,
        now: Instant,
        idle: bool,
        cfg: &BatcherConfig,
        expired: &mut Vec<Arc<Slot<O, E>>>,
    ) -> Result<Cut<I, O, E>, Option<Instant>> {
        let at_once = idle && !cfg.wait_when_idle;
        loop {
            if self.live == 0 {
                return Err(None);
            }
            // Warm-up requests are only considered when no user request is queued.
            let warm = self.live == self.warm_live;
            let draining = self.closed;
            let limit = self.max_batch_weight;
            let mut best: Option<(u64, (u64, Reverse<u64>))> = None;
            let mut next: Option<Instant> = None;
            for (&key, b) in self.buckets.iter_mut() {
                let c = if warm { b.warm } else { b.user };
                if c.live == 0 {
                    continue;
                }
                let mut oldest: Option<Instant> = None;
                let mut head_rank = None;
                for (&lvl, level) in b.levels.iter_mut() {
                    if (lvl == 0) != warm {
                        continue;
                    }
                    if let Some(e) = level.head() {
                        let s = &e.slot;
                        oldest = Some(oldest.map_or(s.enqueued, |o| o.min(s.enqueued)));
                        let r = rank(lvl, s.enqueued, s.id, now, cfg.priority_aging);
                        if head_rank.is_none_or(|h| r > h) {
                            head_rank = Some(r);
                        }
                    }
                }
                let (Some(oldest), Some(head_rank)) = (oldest, head_rank) else {
                    continue;
                };
                let full = c.live >= cfg.max_batch_size
                    || match cfg.weight_mode {
                        WeightMode::Sum => c.weight >= limit,
                        WeightMode::Padded => c.max_hint.saturating_mul(c.live as u64) >= limit,
                    };
                let ready_at = oldest.checked_add(cfg.max_delay).unwrap_or(oldest);
                if at_once || draining || full || cfg.max_delay.is_zero() || now >= ready_at {
                    if best.is_none_or(|(_, r)| head_rank > r) {
                        best = Some((key, head_rank));
                    }
                } else {
                    next = Some(next.map_or(ready_at, |n| n.min(ready_at)));
                }
            }
            let Some((key, _)) = best else {
                return Err(next);
            };
            let batch = self.take_from(key, warm, now, cfg, expired);
            if !batch.slots.is_empty() {
                return Ok(batch);
            }
            // Everything we looked at had expired; look again.
        }
    }

    fn take_from(
        &mut self,
        key: u64,
        warm: bool,
        now: Instant,
        cfg: &BatcherConfig,
        expired: &mut Vec<Arc<Slot<O, E>>>,
    ) -> Cut<I, O, E> {
        let limit = self.max_batch_weight;
        let mut items = Vec::new();
        let mut slots: Vec<Arc<Slot<O, E>>> = Vec::new();
        let (mut weight, mut max_w) = (0u64, 0u64);
        let (mut total_q, mut max_q) = (Duration::ZERO, Duration::ZERO);
        let mut expired_here: Vec<Arc<Slot<O, E>>> = Vec::new();
        let Some(b) = self.buckets.get_mut(&key) else {
            return self.finish_cut(items, slots, 0, 0, Duration::ZERO, Duration::ZERO);
        };
        while slots.len() < cfg.max_batch_size {
            let mut pick: Option<(u8, (u64, Reverse<u64>))> = None;
            for (&lvl, level) in b.levels.iter_mut() {
                if (lvl == 0) != warm {
                    continue;
                }
                if let Some(e) = level.head() {
                    let r = rank(lvl, e.slot.enqueued, e.slot.id, now, cfg.priority_aging);
                    if pick.is_none_or(|(_, p)| r > p) {
                        pick = Some((lvl, r));
                    }
                }
            }
            let Some((lvl, _)) = pick else { break };
            let level = b.levels.get_mut(&lvl).expect("picked level exists");
            let head = level.deque.front().expect("picked level has a head");
            let w = head.slot.weight;
            if head.slot.deadline.is_some_and(|d| d <= now) {
                let e = level.deque.pop_front().expect("head exists");
                e.slot.set_state(EXPIRED);
                b.remove(lvl, w);
                expired_here.push(e.slot);
                continue;
            }
            if !fits(cfg.weight_mode, limit, slots.len(), weight, max_w, w) {
                break;
            }
            let e = level.deque.pop_front().expect("head exists");
            e.slot.set_state(BATCHED);
            b.remove(lvl, w);
            let q = now.saturating_duration_since(e.slot.enqueued);
            total_q += q;
            max_q = max_q.max(q);
            weight += w;
            max_w = max_w.max(w);
            items.push(e.item);
            slots.push(e.slot);
        }
        b.levels.retain(|_, l| !l.deque.is_empty());
        if b.live() == 0 {
            self.buckets.remove(&key);
        }
        for s in &expired_here {
            self.live -= 1;
            self.weight -= s.weight;
            if s.level == 0 {
                self.warm_live -= 1;
            }
            self.counters.timed_out += 1;
        }
        expired.append(&mut expired_here);
        for s in &slots {
            self.live -= 1;
            self.weight -= s.weight;
            if s.level == 0 {
                self.warm_live -= 1;
            }
            let q = now.saturating_duration_since(s.enqueued);
            self.counters.record_queue_time(q);
        }
        let padded = max_w.saturating_mul(slots.len() as u64);
        if !slots.is_empty() {
            self.counters.record_batch(slots.len(), weight, padded);
        }
        self.finish_cut(items, slots, weight, padded, total_q, max_q)
    }

    fn finish_cut(
        &mut self,
        items: Vec<I>,
        slots: Vec<Arc<Slot<O, E>>>,
        weight: u64,
        padded_weight: u64,
        total_queue_time: Duration,
        max_queue_time: Duration,
    ) -> Cut<I, O, E> {
        let id = self.next_batch;
        if !slots.is_empty() {
            self.next_batch += 1;
        }
        Cut {
            id,
            items,
            slots,
            weight,
            padded_weight,
            total_queue_time,
            max_queue_time,
        }
    }
}
