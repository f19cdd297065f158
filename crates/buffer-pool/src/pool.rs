//! The pool itself: accounting, the cache of free buffers, waiting, trimming.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::class::size_class;
use crate::config::{BufferPoolConfig, NamedPoolConfig, ZeroOnRelease};
use crate::error::{Error, Result};
use crate::events::{FreeReason, Listener, PoolEvent, TrimReason};
use crate::lease::{Holder, Lease};
use crate::raw::RawBuf;
use crate::stats::{BufferPoolStats, PoolStats, TrimReport};

/// Fixed facts about one named pool.
struct PoolMeta {
    name: Arc<str>,
    budget: usize,
    zero: ZeroOnRelease,
}

/// A cached buffer and when it was returned.
struct FreeBuf {
    buf: RawBuf,
    since: Instant,
}

/// Mutable accounting of one named pool.
#[derive(Default)]
struct PoolState {
    /// Free buffers by capacity; each deque is oldest-first.
    free: BTreeMap<usize, VecDeque<FreeBuf>>,
    in_use: usize,
    cached: usize,
    cached_buffers: usize,
    leased: usize,
    requested: usize,
    high_water: usize,
    hits: u64,
    misses: u64,
    evictions: u64,
    trimmed_bytes: u64,
    exhausted: u64,
    waits: u64,
}

/// Everything behind the lock.
struct State {
    pools: Vec<PoolState>,
    in_use: usize,
    cached: usize,
    high_water: usize,
    next_trim: Instant,
    waiters: usize,
}

/// Buffers taken out of the cache, to be deallocated once the lock is released.
type Freed = Vec<(usize, RawBuf)>;

/// State shared by a [`BufferPool`], its [`NamedPool`] handles and every lease.
pub(crate) struct Shared {
    state: Mutex<State>,
    released: Condvar,
    meta: Vec<PoolMeta>,
    total_budget: usize,
    idle_ttl: Duration,
    trim_every: Duration,
    trim_on_release: bool,
    listeners: RwLock<Vec<Listener>>,
    has_listeners: AtomicBool,
    config: BufferPoolConfig,
}

/// Reusable buffers under a hard byte budget, shared between threads.
///
/// Cloning is cheap (the clones share one pool). The methods here act on the
/// first configured pool; [`BufferPool::pool`] gives a handle on any named
/// pool. See the crate documentation for the model of operation.
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<Shared>,
}

/// A handle on one named pool of a [`BufferPool`]; cheap to clone.
#[derive(Clone)]
pub struct NamedPool {
    shared: Arc<Shared>,
    idx: usize,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for NamedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedPool")
            .field("name", &self.shared.meta[self.idx].name)
            .field("budget_bytes", &self.shared.meta[self.idx].budget)
            .finish_non_exhaustive()
    }
}

impl BufferPool {
    /// Creates a pool from `config`, checking that it is consistent: a
    /// non-zero total, unique non-empty pool names, each pool's budget
    /// non-zero and at most the total. No memory is allocated up front.
    pub fn new(config: BufferPoolConfig) -> Result<Self> {
        let invalid = |field: String, value: String, expected: &str| {
            Err(Error::invalid(field, value, expected))
        };
        if config.total_budget_bytes == 0 {
            return invalid(
                "total_budget_bytes".into(),
                "0".into(),
                "at least one buffer's worth of bytes",
            );
        }
        if config.total_budget_bytes > isize::MAX as usize {
            return invalid(
                "total_budget_bytes".into(),
                config.total_budget_bytes.to_string(),
                &format!("at most the address space ({})", isize::MAX),
            );
        }
        let pools = if config.pools.is_empty() {
            vec![NamedPoolConfig::default()]
        } else {
            config.pools.clone()
        };
        let mut meta: Vec<PoolMeta> = Vec::with_capacity(pools.len());
        for p in &pools {
            if p.name.is_empty() {
                return invalid(
                    "pools[].name".into(),
                    "\"\"".into(),
                    "a non-empty name for every pool",
                );
            }
            if meta.iter().any(|m| *m.name == *p.name) {
                return invalid(
                    "pools[].name".into(),
                    format!("{:?} (twice)", p.name),
                    "unique pool names",
                );
            }
            let budget = p.budget_bytes.unwrap_or(config.total_budget_bytes);
            let field = || format!("pools[{:?}].budget_bytes", p.name);
            if budget == 0 {
                return invalid(field(), "0".into(), "at least one byte");
            }
            if budget > config.total_budget_bytes {
                return invalid(
                    field(),
                    budget.to_string(),
                    &format!(
                        "at most total_budget_bytes = {}: a pool's budget lies within the total",
                        config.total_budget_bytes
                    ),
                );
            }
            meta.push(PoolMeta {
                name: Arc::from(p.name.as_str()),
                budget,
                zero: p.zero_on_release,
            });
        }
        let trim_every = (config.idle_ttl / 4).max(Duration::from_millis(1));
        let state = State {
            pools: meta.iter().map(|_| PoolState::default()).collect(),
            in_use: 0,
            cached: 0,
            high_water: 0,
            next_trim: Instant::now() + trim_every,
            waiters: 0,
        };
        tracing::debug!(
            total_budget_bytes = config.total_budget_bytes,
            pools = meta.len(),
            "buffer pool created"
        );
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                released: Condvar::new(),
                meta,
                total_budget: config.total_budget_bytes,
                idle_ttl: config.idle_ttl,
                trim_every,
                trim_on_release: config.trim_on_release,
                listeners: RwLock::new(Vec::new()),
                has_listeners: AtomicBool::new(false),
                config,
            }),
        })
    }

    /// The configuration the pool was created with.
    pub fn config(&self) -> &BufferPoolConfig {
        &self.shared.config
    }

    /// The named pool `name`.
    pub fn pool(&self, name: &str) -> Result<NamedPool> {
        match self.shared.meta.iter().position(|m| &*m.name == name) {
            Some(idx) => Ok(NamedPool {
                shared: Arc::clone(&self.shared),
                idx,
            }),
            None => Err(Error::UnknownPool {
                name: name.to_owned(),
                known: self.pool_names(),
            }),
        }
    }

    /// Names of the configured pools, in configuration order.
    pub fn pool_names(&self) -> Vec<String> {
        self.shared
            .meta
            .iter()
            .map(|m| m.name.to_string())
            .collect()
    }

    /// The first configured pool.
    pub fn default_pool(&self) -> NamedPool {
        NamedPool {
            shared: Arc::clone(&self.shared),
            idx: 0,
        }
    }

    /// [`NamedPool::try_acquire`] on the first pool.
    pub fn try_acquire(&self, bytes: usize) -> Result<Lease> {
        self.shared.acquire_one(0, bytes, None)
    }

    /// [`NamedPool::acquire_timeout`] on the first pool.
    pub fn acquire_timeout(&self, bytes: usize, timeout: Duration) -> Result<Lease> {
        self.shared.acquire_one(0, bytes, Some(timeout))
    }

    /// [`NamedPool::try_acquire_f32`] on the first pool.
    pub fn try_acquire_f32(&self, count: usize) -> Result<Lease> {
        self.shared.acquire_one(0, f32_bytes(count)?, None)
    }

    /// [`NamedPool::acquire_all`] on the first pool.
    pub fn acquire_all(&self, sizes: &[usize]) -> Result<Vec<Lease>> {
        self.shared.acquire_all(0, sizes, None)
    }

    /// [`NamedPool::acquire_all_timeout`] on the first pool.
    pub fn acquire_all_timeout(&self, sizes: &[usize], timeout: Duration) -> Result<Vec<Lease>> {
        self.shared.acquire_all(0, sizes, Some(timeout))
    }

    /// Releases to the operating system every cached buffer, in every pool,
    /// that has been free for at least `idle_ttl`.
    pub fn trim_idle(&self) -> TrimReport {
        self.shared.trim_idle(Instant::now())
    }

    /// Releases cached buffers (oldest first) until each pool holds at most
    /// `fraction` of its budget and all pools together at most `fraction` of
    /// the total, or nothing is cached any more. Leased buffers are never
    /// touched, so a pool whose leases alone exceed the target ends with an
    /// empty cache. The emergency path uses `shrink_to(0.25)`; `shrink_to(0.0)`
    /// empties every cache.
    pub fn shrink_to(&self, fraction: f64) -> Result<TrimReport> {
        self.shared.shrink_to(fraction)
    }

    /// A snapshot of the accounting, the total and every pool.
    pub fn stats(&self) -> BufferPoolStats {
        self.shared.stats()
    }

    /// Registers a listener called on every allocation, release to the OS and
    /// trim pass (see [`PoolEvent`]). Listeners cannot be removed; they live
    /// as long as the pool.
    pub fn on_event(&self, listener: impl Fn(&PoolEvent) + Send + Sync + 'static) {
        self.shared.listeners.write().push(Arc::new(listener));
        self.shared.has_listeners.store(true, Ordering::Release);
    }

    /// Starts a thread that calls [`trim_idle`](Self::trim_idle) every
    /// `every`, for programs that may go quiet (the opportunistic trim only
    /// runs when leases are released). The thread holds no strong reference
    /// to the pool; it stops when the returned [`Trimmer`] is dropped or the
    /// pool is gone.
    pub fn spawn_trimmer(&self, every: Duration) -> Result<Trimmer> {
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop2 = Arc::clone(&stop);
        let every = every.max(Duration::from_millis(1));
        let handle = std::thread::Builder::new()
            .name("buffer-pool-trim".into())
            .spawn(move || {
                let (flag, cond) = &*stop2;
                loop {
                    {
                        let mut stopped = flag.lock();
                        if !*stopped {
                            cond.wait_for(&mut stopped, every);
                        }
                        if *stopped {
                            return;
                        }
                    }
                    match weak.upgrade() {
                        Some(shared) => {
                            shared.trim_idle(Instant::now());
                        }
                        None => return,
                    }
                }
            })?;
        Ok(Trimmer {
            stop,
            handle: Some(handle),
        })
    }
}

impl NamedPool {
    /// Name of this pool.
    pub fn name(&self) -> &str {
        &self.shared.meta[self.idx].name
    }

    /// Budget of this pool in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.shared.meta[self.idx].budget
    }

    /// A lease of `bytes` bytes, at once or not at all.
    ///
    /// Served from the cache when a free buffer of the same size class is
    /// there (a hit); otherwise a fresh zeroed buffer is allocated (a miss),
    /// after evicting cached buffers of other classes (this pool's first, then
    /// other pools') when the allocation would exceed a budget. Fails with
    /// [`Error::Exhausted`] when leases already hold too much of the budget,
    /// and with [`Error::TooLarge`] when the request exceeds the budget itself.
    /// A request of zero bytes gives an empty lease that holds no buffer.
    pub fn try_acquire(&self, bytes: usize) -> Result<Lease> {
        self.shared.acquire_one(self.idx, bytes, None)
    }

    /// Like [`try_acquire`](Self::try_acquire), but waits up to `timeout` for
    /// other leases to be released before failing with [`Error::Exhausted`].
    pub fn acquire_timeout(&self, bytes: usize, timeout: Duration) -> Result<Lease> {
        self.shared.acquire_one(self.idx, bytes, Some(timeout))
    }

    /// A lease of `count` `f32` values (`4 * count` bytes), at once or not at all.
    pub fn try_acquire_f32(&self, count: usize) -> Result<Lease> {
        self.shared.acquire_one(self.idx, f32_bytes(count)?, None)
    }

    /// Like [`try_acquire_f32`](Self::try_acquire_f32), waiting up to `timeout`.
    pub fn acquire_f32_timeout(&self, count: usize, timeout: Duration) -> Result<Lease> {
        self.shared
            .acquire_one(self.idx, f32_bytes(count)?, Some(timeout))
    }

    /// Leases for every size in `sizes` (in order), all at once or none: a
    /// job that needs several buffers either gets them together or holds
    /// nothing, so two jobs can never deadlock each holding half of what
    /// they need.
    pub fn acquire_all(&self, sizes: &[usize]) -> Result<Vec<Lease>> {
        self.shared.acquire_all(self.idx, sizes, None)
    }

    /// Like [`acquire_all`](Self::acquire_all), waiting up to `timeout` until
    /// the whole set fits.
    pub fn acquire_all_timeout(&self, sizes: &[usize], timeout: Duration) -> Result<Vec<Lease>> {
        self.shared.acquire_all(self.idx, sizes, Some(timeout))
    }

    /// A snapshot of this pool's accounting.
    pub fn stats(&self) -> PoolStats {
        let st = self.shared.state.lock();
        self.shared.pool_stats(&st, self.idx)
    }
}

/// Handle on the background trimming thread started by
/// [`BufferPool::spawn_trimmer`]; dropping it stops and joins the thread.
pub struct Trimmer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Trimmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trimmer").finish_non_exhaustive()
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        let (flag, cond) = &*self.stop;
        *flag.lock() = true;
        cond.notify_all();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn f32_bytes(count: usize) -> Result<usize> {
    count
        .checked_mul(std::mem::size_of::<f32>())
        .ok_or(Error::SizeOverflow {
            count,
            elem_size: std::mem::size_of::<f32>(),
        })
}

impl Shared {
    /// The bytes one pool may hold: its budget, bounded by the total.
    fn limit(&self, idx: usize) -> usize {
        self.meta[idx].budget.min(self.total_budget)
    }

    /// The capacity a request of `bytes` takes in pool `idx`, or `TooLarge`.
    /// Classes above the pool's limit are capped at the limit so that any
    /// request within the budget can be served.
    pub(crate) fn class_for(&self, idx: usize, bytes: usize) -> Result<usize> {
        let limit = self.limit(idx);
        let rounded = size_class(bytes).unwrap_or(usize::MAX);
        if bytes > limit {
            return Err(Error::TooLarge {
                pool: Arc::clone(&self.meta[idx].name),
                requested: bytes,
                rounded,
                budget: limit,
            });
        }
        Ok(rounded.min(limit))
    }

    fn fits(&self, st: &State, idx: usize, bytes: usize) -> bool {
        st.pools[idx].in_use + bytes <= self.meta[idx].budget
            && st.in_use + bytes <= self.total_budget
    }

    fn exhausted(
        &self,
        st: &mut State,
        idx: usize,
        requested: usize,
        rounded: usize,
        waited: Duration,
    ) -> Error {
        st.pools[idx].exhausted += 1;
        let pool_free = self.meta[idx].budget - st.pools[idx].in_use;
        let total_free = self.total_budget - st.in_use;
        let budget = if total_free < pool_free {
            self.total_budget
        } else {
            self.meta[idx].budget
        };
        tracing::debug!(
            pool = &*self.meta[idx].name,
            requested,
            rounded,
            free = pool_free.min(total_free),
            ?waited,
            "buffer pool exhausted"
        );
        Error::Exhausted {
            pool: Arc::clone(&self.meta[idx].name),
            requested,
            rounded,
            free: pool_free.min(total_free),
            budget,
            waited,
        }
    }

    /// Waits until `rounded` bytes fit in pool `idx` or the timeout passes.
    /// Returns the guard with the bytes fitting, or the `Exhausted` error.
    fn wait_for_room<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        idx: usize,
        requested: usize,
        rounded: usize,
        timeout: Option<Duration>,
    ) -> Result<MutexGuard<'a, State>> {
        let mut started: Option<(Instant, Option<Instant>)> = None;
        loop {
            if self.fits(&st, idx, rounded) {
                return Ok(st);
            }
            let Some(timeout) = timeout else {
                return Err(self.exhausted(&mut st, idx, requested, rounded, Duration::ZERO));
            };
            let now = Instant::now();
            let (start, deadline) = *started.get_or_insert_with(|| {
                st.pools[idx].waits += 1;
                (now, now.checked_add(timeout))
            });
            match deadline {
                Some(deadline) if now >= deadline => {
                    let waited = now - start;
                    return Err(self.exhausted(&mut st, idx, requested, rounded, waited));
                }
                Some(deadline) => {
                    st.waiters += 1;
                    self.released.wait_until(&mut st, deadline);
                    st.waiters -= 1;
                }
                None => {
                    st.waiters += 1;
                    self.released.wait(&mut st);
                    st.waiters -= 1;
                }
            }
        }
    }

    /// Takes a buffer of `class` bytes for pool `idx` under the lock, the
    /// room having been checked: a cached buffer (hit, `Some`) or a
    /// reservation for a fresh allocation (miss, `None`), evicting cached
    /// buffers into `freed` as needed to stay within the budgets.
    fn take_locked(
        &self,
        st: &mut State,
        idx: usize,
        class: usize,
        requested: usize,
        freed: &mut Freed,
    ) -> Option<RawBuf> {
        let p = &mut st.pools[idx];
        p.requested += requested;
        p.leased += 1;
        if let Some(fb) = p.free.get_mut(&class).and_then(VecDeque::pop_back) {
            p.cached -= class;
            p.cached_buffers -= 1;
            p.in_use += class;
            p.hits += 1;
            st.cached -= class;
            st.in_use += class;
            return Some(fb.buf);
        }
        p.misses += 1;
        let over_pool = (p.in_use + p.cached + class).saturating_sub(self.meta[idx].budget);
        if over_pool > 0 {
            self.evict_oldest(st, Some(idx), over_pool, FreeReason::Evicted, freed);
        }
        let over_total = (st.in_use + st.cached + class).saturating_sub(self.total_budget);
        if over_total > 0 {
            let got = self.evict_oldest(st, Some(idx), over_total, FreeReason::Evicted, freed);
            if got < over_total {
                self.evict_oldest(st, None, over_total - got, FreeReason::Evicted, freed);
            }
        }
        let p = &mut st.pools[idx];
        p.in_use += class;
        p.high_water = p.high_water.max(p.in_use + p.cached);
        st.in_use += class;
        st.high_water = st.high_water.max(st.in_use + st.cached);
        debug_assert!(p.in_use + p.cached <= self.meta[idx].budget);
        debug_assert!(st.in_use + st.cached <= self.total_budget);
        None
    }

    /// Evicts cached buffers, oldest first, from pool `only` (or from all
    /// pools) until at least `need` bytes are out or the cache is empty.
    /// Returns the bytes evicted.
    fn evict_oldest(
        &self,
        st: &mut State,
        only: Option<usize>,
        need: usize,
        reason: FreeReason,
        freed: &mut Freed,
    ) -> usize {
        let mut got = 0;
        while got < need {
            let mut oldest: Option<(usize, usize, Instant)> = None;
            let range = match only {
                Some(i) => i..i + 1,
                None => 0..st.pools.len(),
            };
            for i in range {
                for (&class, dq) in &st.pools[i].free {
                    if let Some(front) = dq.front() {
                        if oldest.is_none_or(|(_, _, t)| front.since < t) {
                            oldest = Some((i, class, front.since));
                        }
                    }
                }
            }
            let Some((i, class, _)) = oldest else { break };
            let Some(fb) = st.pools[i]
                .free
                .get_mut(&class)
                .and_then(VecDeque::pop_front)
            else {
                break;
            };
            self.uncache(st, i, class, reason);
            got += class;
            freed.push((i, fb.buf));
        }
        got
    }

    /// Accounting for a cached buffer of `class` bytes leaving pool `i`.
    fn uncache(&self, st: &mut State, i: usize, class: usize, reason: FreeReason) {
        let p = &mut st.pools[i];
        p.cached -= class;
        p.cached_buffers -= 1;
        match reason {
            FreeReason::Evicted => p.evictions += 1,
            _ => p.trimmed_bytes += class as u64,
        }
        st.cached -= class;
    }

    /// Undoes the reservation of a fresh buffer whose allocation failed.
    fn unreserve(&self, idx: usize, class: usize, requested: usize) {
        let mut st = self.state.lock();
        let p = &mut st.pools[idx];
        p.in_use -= class;
        p.requested -= requested;
        p.leased -= 1;
        st.in_use -= class;
        let notify = st.waiters > 0;
        drop(st);
        if notify {
            self.released.notify_all();
        }
    }

    fn lease(self: &Arc<Self>, idx: usize, buf: RawBuf, requested: usize) -> Lease {
        Lease::new(
            Holder::new(Arc::clone(self), idx, buf, requested),
            requested,
        )
    }

    /// Allocates a fresh buffer for a reservation made under the lock.
    fn allocate(self: &Arc<Self>, idx: usize, class: usize, requested: usize) -> Result<Lease> {
        match RawBuf::zeroed(class) {
            Some(buf) => {
                tracing::trace!(
                    pool = &*self.meta[idx].name,
                    bytes = class,
                    "buffer allocated"
                );
                if self.has_listeners.load(Ordering::Acquire) {
                    self.emit(&[PoolEvent::Alloc {
                        pool: Arc::clone(&self.meta[idx].name),
                        bytes: class,
                    }]);
                }
                Ok(self.lease(idx, buf, requested))
            }
            None => {
                self.unreserve(idx, class, requested);
                Err(Error::AllocationFailed { bytes: class })
            }
        }
    }

    pub(crate) fn acquire_one(
        self: &Arc<Self>,
        idx: usize,
        bytes: usize,
        timeout: Option<Duration>,
    ) -> Result<Lease> {
        let class = self.class_for(idx, bytes)?;
        if class == 0 {
            return Ok(Lease::empty());
        }
        let mut freed = Freed::new();
        let st = self.state.lock();
        let mut st = self.wait_for_room(st, idx, bytes, class, timeout)?;
        let hit = self.take_locked(&mut st, idx, class, bytes, &mut freed);
        drop(st);
        if !freed.is_empty() {
            self.release_freed(freed, FreeReason::Evicted, None);
        }
        match hit {
            Some(buf) => Ok(self.lease(idx, buf, bytes)),
            None => self.allocate(idx, class, bytes),
        }
    }

    pub(crate) fn acquire_all(
        self: &Arc<Self>,
        idx: usize,
        sizes: &[usize],
        timeout: Option<Duration>,
    ) -> Result<Vec<Lease>> {
        let mut classes = Vec::with_capacity(sizes.len());
        let mut requested = 0usize;
        let mut rounded = 0usize;
        for &bytes in sizes {
            let class = self.class_for(idx, bytes)?;
            requested = requested.saturating_add(bytes);
            rounded = rounded.saturating_add(class);
            classes.push(class);
        }
        if rounded > self.limit(idx) {
            return Err(Error::TooLarge {
                pool: Arc::clone(&self.meta[idx].name),
                requested,
                rounded,
                budget: self.limit(idx),
            });
        }
        let mut freed = Freed::new();
        let st = self.state.lock();
        let mut st = self.wait_for_room(st, idx, requested, rounded, timeout)?;
        let grants: Vec<Option<RawBuf>> = sizes
            .iter()
            .zip(&classes)
            .map(|(&bytes, &class)| {
                if class == 0 {
                    None
                } else {
                    self.take_locked(&mut st, idx, class, bytes, &mut freed)
                }
            })
            .collect();
        drop(st);
        if !freed.is_empty() {
            self.release_freed(freed, FreeReason::Evicted, None);
        }
        let mut leases = Vec::with_capacity(sizes.len());
        let mut failure = None;
        for ((&bytes, &class), grant) in sizes.iter().zip(&classes).zip(grants) {
            if class == 0 {
                leases.push(Lease::empty());
                continue;
            }
            match (grant, &failure) {
                (Some(buf), _) => leases.push(self.lease(idx, buf, bytes)),
                (None, Some(_)) => self.unreserve(idx, class, bytes),
                (None, None) => match self.allocate(idx, class, bytes) {
                    Ok(lease) => leases.push(lease),
                    Err(e) => failure = Some(e),
                },
            }
        }
        match failure {
            // Dropping `leases` returns every buffer already granted.
            Some(e) => Err(e),
            None => Ok(leases),
        }
    }

    /// Returns a leased buffer to pool `idx`'s cache (called when the last
    /// piece of a lease is dropped). `dirty` bytes from the start may have
    /// been written and are zeroed first under [`ZeroOnRelease::On`].
    pub(crate) fn release(&self, idx: usize, mut buf: RawBuf, requested: usize, dirty: usize) {
        if self.meta[idx].zero == ZeroOnRelease::On {
            buf.zero_prefix(dirty);
        }
        let now = Instant::now();
        let class = buf.cap();
        let mut freed = Freed::new();
        let mut st = self.state.lock();
        let p = &mut st.pools[idx];
        p.in_use -= class;
        p.requested -= requested;
        p.leased -= 1;
        p.cached += class;
        p.cached_buffers += 1;
        p.free
            .entry(class)
            .or_default()
            .push_back(FreeBuf { buf, since: now });
        st.in_use -= class;
        st.cached += class;
        if self.trim_on_release && now >= st.next_trim {
            st.next_trim = now + self.trim_every;
            self.trim_locked(&mut st, now, &mut freed);
        }
        let notify = st.waiters > 0;
        drop(st);
        if notify {
            self.released.notify_all();
        }
        if !freed.is_empty() {
            self.release_freed(freed, FreeReason::Idle, Some(TrimReason::Idle));
        }
    }

    /// Accounting for `Lease::shrink`: the lease's buffer shrank from
    /// `old_cap` to `new_cap`, and its requested length from `old_requested`
    /// to `new_requested`.
    pub(crate) fn shrunk(
        &self,
        idx: usize,
        old_cap: usize,
        new_cap: usize,
        old_requested: usize,
        new_requested: usize,
    ) {
        let mut st = self.state.lock();
        let p = &mut st.pools[idx];
        p.in_use -= old_cap - new_cap;
        p.requested -= old_requested - new_requested;
        st.in_use -= old_cap - new_cap;
        let notify = st.waiters > 0;
        drop(st);
        if notify {
            self.released.notify_all();
        }
        if self.has_listeners.load(Ordering::Acquire) {
            self.emit(&[PoolEvent::Free {
                pool: Arc::clone(&self.meta[idx].name),
                bytes: old_cap - new_cap,
                reason: FreeReason::LeaseShrunk,
            }]);
        }
    }

    fn trim_locked(&self, st: &mut State, now: Instant, freed: &mut Freed) {
        for i in 0..st.pools.len() {
            loop {
                let mut expired = None;
                for (&class, dq) in &st.pools[i].free {
                    if dq
                        .front()
                        .is_some_and(|f| now.saturating_duration_since(f.since) >= self.idle_ttl)
                    {
                        expired = Some(class);
                        break;
                    }
                }
                let Some(class) = expired else { break };
                while let Some(dq) = st.pools[i].free.get_mut(&class) {
                    match dq.front() {
                        Some(f) if now.saturating_duration_since(f.since) >= self.idle_ttl => {
                            let Some(fb) = dq.pop_front() else { break };
                            self.uncache(st, i, class, FreeReason::Idle);
                            freed.push((i, fb.buf));
                        }
                        _ => break,
                    }
                }
            }
        }
    }

    pub(crate) fn trim_idle(&self, now: Instant) -> TrimReport {
        let mut freed = Freed::new();
        {
            let mut st = self.state.lock();
            st.next_trim = now + self.trim_every;
            self.trim_locked(&mut st, now, &mut freed);
        }
        self.release_freed(freed, FreeReason::Idle, Some(TrimReason::Idle))
    }

    pub(crate) fn shrink_to(&self, fraction: f64) -> Result<TrimReport> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::InvalidFraction { fraction });
        }
        let mut freed = Freed::new();
        {
            let mut st = self.state.lock();
            for i in 0..st.pools.len() {
                let target = (self.meta[i].budget as f64 * fraction) as usize;
                let held = st.pools[i].in_use + st.pools[i].cached;
                if held > target {
                    self.evict_oldest(
                        &mut st,
                        Some(i),
                        held - target,
                        FreeReason::Shrink,
                        &mut freed,
                    );
                }
            }
            let target = (self.total_budget as f64 * fraction) as usize;
            let held = st.in_use + st.cached;
            if held > target {
                self.evict_oldest(&mut st, None, held - target, FreeReason::Shrink, &mut freed);
            }
        }
        let report = self.release_freed(freed, FreeReason::Shrink, Some(TrimReason::Shrink));
        tracing::debug!(
            fraction,
            buffers = report.buffers,
            bytes = report.bytes,
            "buffer pool shrunk"
        );
        Ok(report)
    }

    /// Deallocates buffers taken out of the cache (outside the lock) and
    /// tells the listeners.
    fn release_freed(
        &self,
        freed: Freed,
        reason: FreeReason,
        trim: Option<TrimReason>,
    ) -> TrimReport {
        let mut report = TrimReport::default();
        let mut per_pool = vec![TrimReport::default(); self.meta.len()];
        let listening = self.has_listeners.load(Ordering::Acquire);
        let mut events = Vec::new();
        for (i, buf) in freed {
            let bytes = buf.cap();
            drop(buf);
            report.buffers += 1;
            report.bytes += bytes;
            per_pool[i].buffers += 1;
            per_pool[i].bytes += bytes;
            if listening {
                events.push(PoolEvent::Free {
                    pool: Arc::clone(&self.meta[i].name),
                    bytes,
                    reason,
                });
            }
        }
        if let Some(trim) = trim {
            for (i, r) in per_pool.iter().enumerate().filter(|(_, r)| r.buffers > 0) {
                tracing::debug!(
                    pool = &*self.meta[i].name,
                    buffers = r.buffers,
                    bytes = r.bytes,
                    ?trim,
                    "buffer pool trimmed"
                );
                if listening {
                    events.push(PoolEvent::Trim {
                        pool: Arc::clone(&self.meta[i].name),
                        buffers: r.buffers,
                        bytes: r.bytes,
                        reason: trim,
                    });
                }
            }
        }
        if !events.is_empty() {
            self.emit(&events);
        }
        report
    }

    fn emit(&self, events: &[PoolEvent]) {
        let listeners: Vec<Listener> = self.listeners.read().clone();
        for event in events {
            for l in &listeners {
                l(event);
            }
        }
    }

    pub(crate) fn pool_name(&self, idx: usize) -> &str {
        &self.meta[idx].name
    }

    fn pool_stats(&self, st: &State, idx: usize) -> PoolStats {
        let p = &st.pools[idx];
        let budget = self.meta[idx].budget;
        PoolStats {
            name: self.meta[idx].name.to_string(),
            budget_bytes: budget,
            in_use_bytes: p.in_use,
            cached_bytes: p.cached,
            cached_buffers: p.cached_buffers,
            leased_buffers: p.leased,
            high_water_bytes: p.high_water,
            hits: p.hits,
            misses: p.misses,
            evictions: p.evictions,
            trimmed_bytes: p.trimmed_bytes,
            exhausted: p.exhausted,
            waits: p.waits,
            rounding_loss_bytes: p.in_use - p.requested,
            utilization_percent: 100.0 * p.in_use as f64 / budget as f64,
        }
    }

    fn stats(&self) -> BufferPoolStats {
        let st = self.state.lock();
        let pools: Vec<PoolStats> = (0..self.meta.len())
            .map(|i| self.pool_stats(&st, i))
            .collect();
        BufferPoolStats {
            total_budget_bytes: self.total_budget,
            in_use_bytes: st.in_use,
            cached_bytes: st.cached,
            high_water_bytes: st.high_water,
            hits: pools.iter().map(|p| p.hits).sum(),
            misses: pools.iter().map(|p| p.misses).sum(),
            rounding_loss_bytes: pools.iter().map(|p| p.rounding_loss_bytes).sum(),
            utilization_percent: 100.0 * st.in_use as f64 / self.total_budget as f64,
            pools,
        }
    }
}
