//! Generative models: GGUF decoders registered under names, loaded lazily
//! within the ledger, each serving through its own continuous-batching step
//! loop. KV is admitted per sequence and grows with it: a sequence joins
//! the loop only where its whole prompt + `max_tokens` fits now (in the
//! ledger and in the decoder's KV pool), but it holds, and the ledger
//! counts, its prompt and [`KV_GROW_TOKENS`] more; it reserves
//! `KV_GROW_TOKENS` more each time it reaches the end of what it holds. An
//! answer that stops early never held KV for tokens it did not generate.
//!
//! When a sequence finds no room to grow, it waits out that step and the
//! loop preempts one running sequence (the lowest priority, latest joined;
//! perhaps the one that waits) as under pressure below, so the others
//! grow into its room. A sequence that runs alone was admitted where its
//! whole length fit above the ledger's safety margin and has nobody to take
//! room from: it grows into the margin while the machine still has the bytes
//! ([`mem_budget::Reservation::grow_into_margin`]; new work is still
//! admitted only above the margin). If even that finds no room, it waits
//! for room up to [`ALONE_ROOM_WAIT`] (freed heap goes back to the OS, the
//! kernel reclaims page cache, the ledger reads the machine again), then
//! ends with finish reason `memory`, what it has generated, and the
//! ledger's numbers: something outside its loop took the memory it was
//! admitted with.
//!
//! Under `Critical` memory pressure the loop preempts every running
//! sequence but one (the highest priority, first joined): each frees its KV
//! blocks and its reservation and goes back to the queue, keeping what it
//! has streamed; nothing new is admitted beside the one left running. Once
//! the pressure falls they are admitted again and recompute their KV from
//! the prompt and the tokens they had generated, then go on where they
//! stopped.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batcher::{Admission, Exit, Progress, Scheduled, StepHandler};
use models::decoder::{Decoder, DecoderConfig, KvLayout, LogitsWanted, Sequence, SequenceStep};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::prefix::PrefixCache;
use crate::generation::{
    EventSink, FinishReason, Finished, GenerationEvent, Served, Timings, Usage,
};

/// A generative model under a name: where its GGUF file is, which tier it
/// serves as, and the limits of its decoder and step loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerativeSpec {
    /// The name requests use.
    pub name: String,
    /// The GGUF file.
    pub gguf: PathBuf,
    /// The tier it serves as: `small` or `medium`. Default small.
    #[serde(default = "small")]
    pub tier: tier_router::Tier,
    /// The decoder's limits (KV budget, step tokens, context).
    #[serde(default)]
    pub decoder: DecoderConfig,
    /// The step loop's limits (running and queued sequences, prefill
    /// chunks, queue wait). Its `max_step_tokens` is held to the decoder's.
    #[serde(default)]
    pub engine: batcher::ContinuousConfig,
    /// Bytes of KV blocks kept for prompts' prefixes (prefix reuse; see
    /// the runtime docs), within the decoder's KV budget: evicted, least
    /// recently used first, whenever a sequence needs their room. 0 turns
    /// prefix reuse off; models with sliding-window layers have none.
    /// Default 32 MiB.
    #[serde(default = "prefix_cache_bytes")]
    pub prefix_cache_bytes: u64,
}

fn prefix_cache_bytes() -> u64 {
    32 << 20
}

fn small() -> tier_router::Tier {
    tier_router::Tier::Small
}

impl GenerativeSpec {
    /// `gguf` served as `name` in `tier`, with the default limits.
    pub fn new(name: impl Into<String>, gguf: impl Into<PathBuf>, tier: tier_router::Tier) -> Self {
        GenerativeSpec {
            name: name.into(),
            gguf: gguf.into(),
            tier,
            decoder: DecoderConfig::default(),
            engine: batcher::ContinuousConfig::default(),
            prefix_cache_bytes: prefix_cache_bytes(),
        }
    }

    /// A model `scripts/fetch-model.sh` fetched (`smollm2-135m`,
    /// `gemma3-270m`), found through [`models::gguf_path`].
    pub fn fetched(name: &str, tier: tier_router::Tier) -> Result<Self> {
        Ok(GenerativeSpec::new(name, models::gguf_path(name)?, tier))
    }
}

/// KV bytes admitted against the decoder's KV pool.
#[derive(Debug, Default)]
pub(crate) struct KvAccount {
    pub(crate) admitted: Mutex<u64>,
    /// The KV budget now: the configured one, or what `reoptimize` planned
    /// for the memory free (see [`Decoders::replan`]).
    pub(crate) budget: AtomicU64,
}

impl KvAccount {
    pub(crate) fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }
}

/// What one admitted sequence holds: its share of the KV pool and its
/// ledger reservation, both released on drop.
#[derive(Debug)]
struct KvHold {
    account: Arc<KvAccount>,
    bytes: u64,
    /// Tokens of KV the bytes cover.
    tokens: usize,
    reservation: mem_budget::Reservation,
}

impl Drop for KvHold {
    fn drop(&mut self) {
        let mut a = self.account.admitted.lock();
        *a = a.saturating_sub(self.bytes);
    }
}

/// Counters shared between a step loop and `status()`.
#[derive(Debug, Default)]
pub(crate) struct GenCounters {
    pub(crate) generated: AtomicU64,
    pub(crate) prompt: AtomicU64,
    /// Tokens read again by preempted sequences recomputing their KV.
    pub(crate) recomputed: AtomicU64,
    /// Times a running sequence was preempted.
    pub(crate) preempted: AtomicU64,
    /// `(when, tokens generated)` of recent steps, for tokens/s.
    pub(crate) recent: Mutex<VecDeque<(Instant, u64)>>,
}

impl GenCounters {
    const WINDOW: Duration = Duration::from_secs(10);

    fn record(&self, tokens: u64) {
        self.generated.fetch_add(tokens, Ordering::Relaxed);
        let now = Instant::now();
        let mut r = self.recent.lock();
        r.push_back((now, tokens));
        while r
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Self::WINDOW)
        {
            r.pop_front();
        }
    }

    /// Tokens generated per second over the last ten seconds.
    pub(crate) fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let r = self.recent.lock();
        let Some((first, _)) = r.front() else {
            return 0.0;
        };
        let span = now.duration_since(*first).max(Duration::from_millis(100));
        if span > Self::WINDOW + Duration::from_secs(1) {
            return 0.0;
        }
        r.iter().map(|(_, n)| n).sum::<u64>() as f64 / span.as_secs_f64()
    }
}

/// One sequence in a step loop.
pub(crate) struct GenSeq {
    /// What the sequence reads before it samples: the prompt, then (after a
    /// preemption) the tokens it had generated.
    prompt: Vec<u32>,
    /// The prompt's own length (for usage).
    prompt_tokens: usize,
    /// Every token generated, in order (what a preemption recomputes).
    history: Vec<u32>,
    read: usize,
    max_tokens: usize,
    /// KV bytes of its whole length (prompt + `max_tokens`).
    kv_bytes: u64,
    /// Why it ended, where the reason alone does not say.
    error: Option<String>,
    kv: Option<Sequence>,
    hold: Option<KvHold>,
    sampler: models::Sampler,
    stops: models::StopMatcher,
    pending: Vec<u8>,
    next: Option<u32>,
    unsent: Vec<u32>,
    generated: usize,
    reason: Option<FinishReason>,
    sink: EventSink,
    started: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    served: Served,
    /// Whether its prompt's prefix was offered to the prefix cache.
    offered: bool,
}

impl GenSeq {
    fn emit(&mut self, text: String) {
        if text.is_empty() && self.unsent.is_empty() {
            return;
        }
        let tokens = std::mem::take(&mut self.unsent);
        self.sink.send(GenerationEvent::Delta { text, tokens });
    }

    /// Text of the pending bytes that is whole UTF-8 now.
    fn take_text(&mut self) -> String {
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_string();
                self.pending.clear();
                s
            }
            Err(e) if e.error_len().is_none() => {
                let valid = e.valid_up_to();
                let s = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                s
            }
            Err(_) => {
                // Bytes that can never be UTF-8: shown as U+FFFD.
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                s
            }
        }
    }
}

/// Tokens of KV a sequence reserves beyond its prompt when it is
/// admitted, and more each time it reaches the end of what it holds.
pub const KV_GROW_TOKENS: usize = 32;

/// The step handler of one decoder.
pub(crate) struct DecoderSteps {
    decoder: Arc<Decoder>,
    /// Tokens one step may hold (the KV layout's windows count them).
    step_tokens: usize,
    /// Running sequences that found no room to grow in the last step.
    short: usize,
    tokenizer: Arc<models::Tokenizer>,
    ledger: mem_budget::MemoryLedger,
    kv: Arc<KvAccount>,
    counters: Arc<GenCounters>,
    monitor: mem_budget::PressureMonitor,
    /// Sequences admitted and not yet finished or preempted.
    running: usize,
    /// When freed heap was last handed back to the OS for a sequence that
    /// found no room.
    last_trim: Option<Instant>,
    /// Since when the one running sequence has found no room to grow.
    alone_short_since: Option<Instant>,
    /// Why the last sequence that found no room to grow found none.
    refused: Option<String>,
    prefix: Option<Arc<PrefixCache>>,
}

/// How often a step loop with nothing running and a sequence waiting for
/// room hands freed heap back to the OS.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// How long a sequence that runs alone and finds no room to grow waits for
/// room (freed heap handed back to the OS, page cache the kernel reclaims,
/// another program's memory) before it ends with finish reason `memory`.
pub const ALONE_ROOM_WAIT: Duration = Duration::from_secs(5);

/// How often a sequence waiting alone for room tries again.
const ALONE_ROOM_POLL: Duration = Duration::from_millis(20);

/// Hands freed heap back to the OS for a sequence that waits for room, at
/// most once every [`TRIM_EVERY`] since `last`.
fn trim_heap(last: &mut Option<Instant>) {
    if last.is_none_or(|t| t.elapsed() >= TRIM_EVERY) {
        crate::cleanup::release_to_os();
        *last = Some(Instant::now());
    }
}

impl DecoderSteps {
    fn critical(&self) -> bool {
        self.monitor.level() == mem_budget::PressureLevel::Critical
    }

    /// KV bytes of a sequence of `tokens`.
    fn kv_bytes_for(&self, tokens: usize) -> u64 {
        self.decoder
            .kv_layout()
            .sequence_bytes(tokens, self.step_tokens) as u64
    }

    /// Tokens a sequence holds KV for when it is admitted or grows past
    /// `tokens`: `KV_GROW_TOKENS` more, within its whole length.
    fn kv_target(&self, s: &GenSeq, tokens: usize) -> usize {
        (tokens + KV_GROW_TOKENS)
            .min(s.prompt_tokens + s.max_tokens)
            .min(self.decoder.context())
            .max(tokens)
    }

    /// Pool blocks resident and idle that a new lease takes first (less
    /// what admitted sequences still have to lease).
    fn idle_kv_bytes(&self, admitted: u64) -> u64 {
        // (Blocks the prefix cache holds count as leased by no sequence,
        // which can only make this smaller.)
        let cached = self.prefix.as_ref().map_or(0, |p| p.weight());
        let leased = (self.decoder.kv_bytes_in_use() as u64).saturating_sub(cached);
        let unleased = admitted.saturating_sub(leased);
        (self.decoder.kv_bytes_cached() as u64).saturating_sub(unleased)
    }

    /// Makes `s`'s hold cover `need` tokens (a step is about to write up
    /// to there). False when neither the KV pool's budget nor the ledger
    /// has room, after the prefix cache has given way.
    fn grow(&mut self, s: &mut GenSeq, need: usize) -> bool {
        let target = self.kv_target(s, need);
        let Some(hold) = s.hold.as_mut() else {
            return false;
        };
        if need <= hold.tokens {
            return true;
        }
        let extra = self.kv_bytes_for(target).saturating_sub(hold.bytes);
        let mut admitted = self.kv.admitted.lock();
        if !self.budget_has_room(*admitted, extra) {
            self.refused = Some(format!(
                "the KV budget of {} bytes has {} admitted",
                self.kv.budget(),
                *admitted
            ));
            return false;
        }
        let idle = self.idle_kv_bytes(*admitted);
        let reservation = &mut hold.reservation;
        // Alone, it was admitted where its whole length fit above the
        // safety margin and has nobody to take room from: it grows into the
        // margin while the machine still has the bytes (new work is still
        // admitted only above it).
        let alone = self.running <= 1;
        let grown = self.reserve_or_shrink(extra, || {
            if alone {
                reservation.grow_into_margin(extra, idle)
            } else {
                reservation.grow_reusing(extra, idle)
            }
        });
        if let Err(e) = grown {
            self.refused = Some(e.to_string());
            return false;
        }
        hold.bytes += extra;
        hold.tokens = target;
        *admitted += extra;
        true
    }

    /// Whether `bytes` more fit the KV pool's budget beside `admitted`,
    /// once the cached prefixes, which share the budget, have given way.
    fn budget_has_room(&self, admitted: u64, bytes: u64) -> bool {
        let cached = || self.prefix.as_ref().map_or(0, |p| p.weight());
        let budget = self.kv.budget();
        let over = (admitted + cached() + bytes).saturating_sub(budget);
        if over == 0 {
            return true;
        }
        match &self.prefix {
            Some(p) if cached() > 0 => p.shrink_by(over),
            _ => return false,
        }
        admitted + cached() + bytes <= budget
    }

    /// `reserve`, tried once more after the cached prefixes (memory the
    /// machine counts) have given way `bytes` when the ledger refuses.
    fn reserve_or_shrink<T>(
        &self,
        bytes: u64,
        mut reserve: impl FnMut() -> mem_budget::Result<T>,
    ) -> mem_budget::Result<T> {
        let reserved = reserve();
        match self.prefix.as_ref().filter(|p| p.weight() > 0) {
            Some(p) if reserved.is_err() => {
                p.shrink_by(bytes);
                reserve()
            }
            _ => reserved,
        }
    }
}

impl StepHandler for DecoderSteps {
    type Seq = GenSeq;

    fn pending_tokens(&self, s: &GenSeq) -> usize {
        if s.reason.is_some() {
            0
        } else if s.read < s.prompt.len() {
            s.prompt.len() - s.read
        } else {
            usize::from(s.next.is_some())
        }
    }

    fn admit(&mut self, s: &mut GenSeq) -> Admission {
        // Under critical pressure one sequence runs at a time.
        if self.running > 0 && self.critical() {
            return Admission::Wait;
        }
        // It starts only where its whole length fits, but holds its prompt
        // and KV_GROW_TOKENS more.
        let full = s.kv_bytes;
        let tokens = self.kv_target(s, s.prompt.len());
        let initial = self.kv_bytes_for(tokens).min(full);
        let mut admitted = self.kv.admitted.lock();
        if !self.budget_has_room(*admitted, full) {
            return Admission::Wait;
        }
        // Blocks the pool keeps idle are resident already and the new
        // sequence leases them first: those bytes are not asked of the
        // machine again.
        let idle = self.idle_kv_bytes(*admitted);
        let reserved = self.reserve_or_shrink(full, || {
            self.ledger.try_reserve_headroom(
                mem_budget::Category::Activations,
                initial,
                full - initial,
                idle,
            )
        });
        let reservation = match reserved {
            Ok(r) => r,
            Err(_) => {
                // Nothing runs, so nothing will free room by finishing:
                // what the heap keeps of freed memory goes back to the OS
                // (at most once a second) and the next try reads the
                // machine again.
                if self.running == 0 {
                    trim_heap(&mut self.last_trim);
                }
                return Admission::Wait;
            }
        };
        *admitted += initial;
        drop(admitted);
        s.hold = Some(KvHold {
            account: Arc::clone(&self.kv),
            bytes: initial,
            tokens,
            reservation,
        });
        // A cached prefix of what it reads spares computing it.
        let shared = self.prefix.as_ref().and_then(|p| p.lookup(&s.prompt));
        s.kv = Some(match shared.map(|p| (self.decoder.sequence_from_prefix(&p), p.tokens())) {
            Some((Ok(kv), tokens)) => {
                s.read = tokens;
                kv
            }
            _ => self.decoder.new_sequence(),
        });
        s.admitted.get_or_insert_with(Instant::now);
        self.running += 1;
        Admission::Admit
    }

    fn preempt_wanted(&mut self, running: usize) -> usize {
        let short = std::mem::take(&mut self.short);
        if running > 1 && self.critical() {
            running - 1
        } else if running > 1 && short > 0 {
            // One sequence's room lets the others grow.
            1
        } else {
            0
        }
    }

    fn preempt(&mut self, s: &mut GenSeq) {
        // Its KV blocks go back to the pool, its bytes to the ledger; it
        // reads the prompt and what it generated again once readmitted,
        // then samples where it stopped.
        s.kv = None;
        s.hold = None;
        self.running = self.running.saturating_sub(1);
        s.prompt.truncate(s.prompt_tokens);
        s.prompt.extend_from_slice(&s.history);
        s.read = 0;
        s.next = None;
        self.counters.preempted.fetch_add(1, Ordering::Relaxed);
    }

    fn step(&mut self, batch: &mut [Scheduled<'_, GenSeq>]) -> Vec<Progress> {
        let n = batch.len();
        // Each sequence's hold must cover what this step writes; one that
        // finds no room waits out the step.
        let mut go = Vec::with_capacity(n);
        for b in batch.iter_mut() {
            let s = &mut *b.seq;
            let feed = if s.read < s.prompt.len() { b.tokens } else { 1 };
            let need = s.kv.as_ref().map_or(0, Sequence::len) + feed;
            go.push(self.grow(s, need));
        }
        let short = go.iter().filter(|g| !**g).count();
        self.short = short;
        if short < n {
            self.alone_short_since = None;
        }
        if short == n {
            if self.running <= 1 {
                // Alone, it has nobody to take room from. The room it was
                // admitted with may come back: the heap hands freed memory
                // back to the OS, the kernel reclaims page cache, and the
                // ledger reads the machine again. It waits for that a
                // while before it gives up.
                let now = Instant::now();
                let since = *self.alone_short_since.get_or_insert(now);
                if now.duration_since(since) < ALONE_ROOM_WAIT {
                    trim_heap(&mut self.last_trim);
                    std::thread::sleep(ALONE_ROOM_POLL);
                    return vec![Progress::Continue; n];
                }
                self.alone_short_since = None;
                return batch
                    .iter_mut()
                    .map(|b| {
                        let s = &mut *b.seq;
                        let len = s.kv.as_ref().map_or(0, Sequence::len);
                        let held = s.hold.as_ref().map_or(0, |h| h.bytes);
                        let want = self.kv_bytes_for(self.kv_target(s, len + 1));
                        s.reason = Some(FinishReason::Memory);
                        s.next = None;
                        let why = self.refused.as_deref().unwrap_or("no reason recorded");
                        s.error = Some(format!(
                            "no room to grow its KV past {len} tokens: it holds {held} bytes and needs {} more, which neither the ledger nor the KV budget ({} bytes) has ({why})",
                            want.saturating_sub(held),
                            self.kv.budget()
                        ));
                        Progress::Done
                    })
                    .collect();
            }
            return vec![Progress::Continue; n];
        }
        let mut wants = Vec::with_capacity(n);
        let result = {
            let mut steps = Vec::with_capacity(n);
            for (b, _) in batch.iter_mut().zip(&go).filter(|(_, g)| **g) {
                let tokens = b.tokens;
                let GenSeq {
                    prompt,
                    read,
                    kv,
                    next,
                    ..
                } = &mut *b.seq;
                let Some(kv) = kv.as_mut() else {
                    return vec![
                        Progress::Failed("a sequence ran before it was admitted".into());
                        n
                    ];
                };
                let (toks, want) = if *read < prompt.len() {
                    let end = *read + tokens;
                    let want = if end == prompt.len() {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    };
                    (&prompt[*read..end], want)
                } else {
                    match next.as_ref() {
                        Some(t) => (std::slice::from_ref(t), LogitsWanted::Last),
                        None => {
                            return vec![Progress::Failed("nothing to step".into()); n];
                        }
                    }
                };
                wants.push(want);
                steps.push(SequenceStep {
                    seq: kv,
                    tokens: toks,
                    logits: want,
                });
            }
            self.decoder.step(&mut steps)
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("the decoder step failed: {e}");
                return vec![Progress::Failed(msg); n];
            }
        };
        let context = self.decoder.context();
        let mut generated = 0u64;
        let mut out = Vec::with_capacity(n);
        let mut k = 0;
        for (b, &g) in batch.iter_mut().zip(&go) {
            if !g {
                out.push(Progress::Continue);
                continue;
            }
            let i = k;
            k += 1;
            let s = &mut *b.seq;
            if s.read < s.prompt.len() {
                let own = (s.read + b.tokens).min(s.prompt_tokens) - s.read.min(s.prompt_tokens);
                s.read += b.tokens;
                if !s.offered && s.read >= s.prompt_tokens {
                    s.offered = true;
                    if let (Some(p), Some(kv)) = (&self.prefix, s.kv.as_mut()) {
                        p.offer(&self.decoder, kv, &s.prompt[..s.prompt_tokens]);
                    }
                }
                self.counters
                    .prompt
                    .fetch_add(own as u64, Ordering::Relaxed);
                self.counters
                    .recomputed
                    .fetch_add((b.tokens - own) as u64, Ordering::Relaxed);
            }
            if wants[i] == LogitsWanted::None {
                out.push(Progress::Continue);
                continue;
            }
            let Some(row) = logits.last(i) else {
                out.push(Progress::Failed("the step returned no logits".into()));
                continue;
            };
            let id = match s.sampler.sample(row) {
                Ok(id) => id,
                Err(e) => {
                    out.push(Progress::Failed(format!("sampling failed: {e}")));
                    continue;
                }
            };
            if s.sampler.is_stop_token(id) {
                s.reason = Some(FinishReason::Stop);
                s.next = None;
                out.push(Progress::Done);
                continue;
            }
            generated += 1;
            s.generated += 1;
            s.history.push(id);
            s.first_token.get_or_insert_with(Instant::now);
            s.unsent.push(id);
            match self.tokenizer.token_bytes(id, false) {
                Ok(bytes) => s.pending.extend_from_slice(&bytes),
                Err(e) => {
                    out.push(Progress::Failed(format!("decoding token {id} failed: {e}")));
                    continue;
                }
            }
            let text = s.take_text();
            let shown = s.stops.push(&text);
            s.emit(shown.text);
            let len = s.kv.as_ref().map_or(0, Sequence::len);
            if shown.stopped {
                s.reason = Some(FinishReason::Stop);
            } else if s.generated >= s.max_tokens || len + 1 >= context {
                s.reason = Some(FinishReason::Length);
            }
            if s.reason.is_some() {
                s.next = None;
                out.push(Progress::Done);
            } else {
                s.next = Some(id);
                out.push(Progress::Continue);
            }
        }
        if generated > 0 {
            self.counters.record(generated);
        }
        out
    }

    fn finish(&mut self, mut s: GenSeq, exit: Exit) {
        // Free the KV first: the final event may wake a caller that checks.
        if s.hold.is_some() {
            self.running = self.running.saturating_sub(1);
        }
        s.kv = None;
        s.hold = None;
        if !s.stops.stopped() {
            let mut tail = s.take_text();
            if !s.pending.is_empty() {
                tail.push_str(&String::from_utf8_lossy(&s.pending));
                s.pending.clear();
            }
            let mut shown = s.stops.push(&tail).text;
            if !s.stops.stopped() {
                shown.push_str(&s.stops.finish());
            }
            s.emit(shown);
        } else {
            s.emit(String::new());
        }
        let (reason, error) = match exit {
            Exit::Done => (s.reason.unwrap_or(FinishReason::Stop), s.error.take()),
            Exit::Cancelled => (FinishReason::Cancelled, None),
            Exit::Deadline => (FinishReason::Deadline, None),
            Exit::NoRoom { waited_ms } => (
                FinishReason::Memory,
                Some(format!(
                    "no room for {} KV bytes came free in {waited_ms} ms",
                    s.kv_bytes
                )),
            ),
            Exit::Refused { reason } => (FinishReason::Memory, Some(reason)),
            Exit::Failed { message } => (FinishReason::Error, Some(message)),
            Exit::Shutdown => (
                FinishReason::Error,
                Some("the model was unloaded before the sequence finished".into()),
            ),
            other => (FinishReason::Error, Some(format!("{other:?}"))),
        };
        let now = Instant::now();
        let ms = |t: Instant| t.duration_since(s.started).as_secs_f64() * 1e3;
        let timings = Timings {
            queued_ms: ms(s.admitted.unwrap_or(now)),
            time_to_first_token_ms: s.first_token.map(ms),
            total_ms: ms(now),
        };
        s.sink.send(GenerationEvent::Finished(Finished {
            reason,
            error,
            usage: Usage {
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.generated,
            },
            timings,
            served: s.served.clone(),
        }));
    }
}

/// A decoder in memory with its step loop and its reservation.
pub(crate) struct LoadedDecoder {
    pub(crate) tokenizer: Arc<models::Tokenizer>,
    pub(crate) template: models::ChatTemplate,
    pub(crate) engine: batcher::ContinuousBatcher<GenSeq>,
    pub(crate) decoder: Arc<Decoder>,
    pub(crate) layout: KvLayout,
    /// Tokens one step holds at most as configured (the step loop's budget
    /// now may be lower: [`Decoders::replan`]). KV is counted for it.
    pub(crate) step_tokens: usize,
    pub(crate) kv: Arc<KvAccount>,
    pub(crate) counters: Arc<GenCounters>,
    /// Weights, repacked copies and the scratch of a step of the budget now.
    pub(crate) reservation: Mutex<mem_budget::Reservation>,
    pub(crate) prefix: Option<Arc<PrefixCache>>,
}

impl std::fmt::Debug for LoadedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedDecoder")
            .field("decoder", &self.decoder)
            .field("reserved", &self.reservation.lock().bytes())
            .finish_non_exhaustive()
    }
}

/// A request made ready for a step loop.
pub(crate) struct Prepared {
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) kv_bytes: u64,
}

impl LoadedDecoder {
    /// Tokenises the request's prompt and works out the KV it needs.
    pub(crate) fn prepare(&self, req: &crate::GenerateRequest) -> Result<Prepared> {
        let (text, parse_special) = match &req.prompt {
            crate::Prompt::Text(t) => (t.clone(), false),
            crate::Prompt::Chat(messages) => (self.template.render(messages, true)?, true),
        };
        let prompt = self.tokenizer.encode(&text, true, parse_special)?;
        if prompt.is_empty() {
            return Err(Error::InvalidInput(
                "the prompt is empty: give at least one token of text".into(),
            ));
        }
        let context = self.decoder.context();
        if prompt.len() >= context {
            return Err(Error::InvalidInput(format!(
                "the prompt is {} tokens, the model's context is {context}; shorten it",
                prompt.len()
            )));
        }
        if req.max_tokens == 0 {
            return Err(Error::InvalidInput(
                "max_tokens is 0: ask for at least one".into(),
            ));
        }
        let max_tokens = req.max_tokens.min(context - prompt.len());
        let kv_bytes =
            self.layout
                .sequence_bytes(prompt.len() + max_tokens, self.step_tokens) as u64;
        let budget = self.kv.budget();
        if kv_bytes > budget {
            return Err(Error::KvTooLarge {
                needed: kv_bytes,
                budget,
                tokens: prompt.len() + max_tokens,
            });
        }
        Ok(Prepared {
            prompt,
            max_tokens,
            kv_bytes,
        })
    }

    /// A sequence for the step loop.
    pub(crate) fn sequence(
        &self,
        p: Prepared,
        req: &crate::GenerateRequest,
        sink: EventSink,
        served: Served,
        started: Instant,
    ) -> Result<GenSeq> {
        let mut cfg = req.sampling.clone();
        cfg.stop.extend(req.stop.iter().cloned());
        let mut sampler = models::Sampler::new(cfg)?.with_stop_tokens(self.tokenizer.eog_tokens());
        sampler.accept(&p.prompt);
        let stops = sampler.stop_matcher();
        Ok(GenSeq {
            prompt_tokens: p.prompt.len(),
            history: Vec::with_capacity(p.max_tokens),
            prompt: p.prompt,
            read: 0,
            max_tokens: p.max_tokens,
            kv_bytes: p.kv_bytes,
            error: None,
            kv: None,
            hold: None,
            sampler,
            stops,
            pending: Vec::new(),
            next: None,
            unsent: Vec::new(),
            generated: 0,
            reason: None,
            sink,
            started,
            admitted: None,
            first_token: None,
            served,
            offered: false,
        })
    }
}

enum GenState {
    Unloaded,
    Loading,
    Loaded(Arc<LoadedDecoder>),
}

struct GenSlot {
    spec: GenerativeSpec,
    state: GenState,
    last_used: Instant,
}

/// How a generative model stands, for [`Status`](crate::Status).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerativeStatus {
    /// Its name.
    pub name: String,
    /// Its tier.
    pub tier: tier_router::Tier,
    /// `loaded`, `loading` or `unloaded`.
    pub state: &'static str,
    /// Bytes reserved in the ledger for its weights and scratch.
    pub reserved_bytes: u64,
    /// Sequences in the step loop now.
    pub running: usize,
    /// Sequences waiting to be admitted.
    pub queued: usize,
    /// KV blocks sequences lease now (over all layer groups), beyond the
    /// ones the prefix cache holds (`prefix_bytes`).
    pub kv_blocks_used: u64,
    /// KV blocks the pool's budget holds beyond those.
    pub kv_blocks_free: u64,
    /// KV bytes admitted: what the running sequences hold, each its
    /// prompt and what it has generated, rounded up to
    /// [`KV_GROW_TOKENS`](crate::KV_GROW_TOKENS) more.
    pub kv_bytes_admitted: u64,
    /// The KV pool's budget.
    pub kv_bytes_budget: u64,
    /// Tokens generated per second over the last ten seconds.
    pub tokens_per_second: f64,
    /// Tokens generated since it loaded.
    pub tokens_generated: u64,
    /// Prompt tokens read since it loaded.
    pub prompt_tokens: u64,
    /// Times a running sequence was preempted under critical pressure.
    pub preempted: u64,
    /// Tokens preempted sequences read again to rebuild their KV.
    pub recomputed_tokens: u64,
    /// Sequences that looked their prompt up in the prefix cache.
    pub prefix_lookups: u64,
    /// Of those, the ones that started after a cached prefix.
    pub prefix_hits: u64,
    /// Prompt tokens not computed thanks to cached prefixes.
    pub prefix_tokens_saved: u64,
    /// Bytes of KV blocks the prefix cache holds now.
    pub prefix_bytes: u64,
    /// Seconds since it last served.
    pub idle_secs: f64,
    /// Its step loop's counters, when loaded.
    pub engine: Option<batcher::ContinuousStats>,
}

/// A loaded decoder's step and KV budgets, part of the [`Plan`](crate::Plan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenerationPlan {
    /// The model's name.
    pub model: String,
    /// Tokens one step holds at most now.
    pub step_tokens: usize,
    /// ... as configured (the most it may hold).
    pub step_tokens_configured: usize,
    /// Bytes of KV all its sequences and its prefix cache may hold now.
    pub kv_budget_bytes: u64,
    /// ... as configured (`DecoderConfig::kv_budget_bytes`).
    pub kv_budget_configured: u64,
    /// Bytes the ledger holds for its weights and step scratch.
    pub reserved_bytes: u64,
}

/// Tokens a step holds for `free` bytes: `configured`, halved under 1 GiB
/// and quartered under 256 MiB, never under 64 (or `configured`).
pub(crate) fn step_tokens_for(configured: usize, free: u64) -> usize {
    let t = if free < (256 << 20) {
        configured / 4
    } else if free < (1 << 30) {
        configured / 2
    } else {
        configured
    };
    t.max(configured.min(64)).max(1)
}

/// Bytes a decoder reserves for its weights, repacked copies and the
/// scratch of a step of `step_tokens` (KV is reserved per sequence): while
/// it loads, with the largest tensor's transient copy; once loaded, without.
fn model_bytes(spec: &GenerativeSpec, step_tokens: usize, loading: bool) -> Result<u64> {
    let cfg = DecoderConfig {
        max_step_tokens: step_tokens,
        ..spec.decoder.clone()
    };
    let est = Decoder::estimate(&spec.gguf, &cfg, 1, 1)?;
    let bytes = if loading {
        est.peak_bytes()
    } else {
        est.running_bytes()
    };
    Ok(bytes.saturating_sub(est.kv_bytes))
}

/// The generative models: lazy loads within the ledger, idle unloads.
pub(crate) struct Decoders {
    ledger: mem_budget::MemoryLedger,
    monitor: mem_budget::PressureMonitor,
    slots: Mutex<HashMap<String, GenSlot>>,
    changed: Condvar,
}

impl std::fmt::Debug for Decoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoders")
            .field("models", &self.names())
            .finish_non_exhaustive()
    }
}

impl Decoders {
    pub(crate) fn new(ledger: mem_budget::MemoryLedger, monitor: mem_budget::PressureMonitor) -> Self {
        Decoders {
            ledger,
            monitor,
            slots: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn register(&self, spec: GenerativeSpec) -> Result<()> {
        if !matches!(
            spec.tier,
            tier_router::Tier::Small | tier_router::Tier::Medium | tier_router::Tier::Large
        ) {
            return Err(Error::invalid(
                "tier",
                format!("{:?}", spec.tier),
                "small, medium or large for a local generative model",
            ));
        }
        spec.engine.validate().map_err(|e| {
            Error::invalid(
                "engine",
                e.to_string(),
                "a valid continuous batcher configuration",
            )
        })?;
        let mut slots = self.slots.lock();
        if slots.contains_key(&spec.name) {
            return Err(Error::invalid(
                "name",
                spec.name.clone(),
                "a name no other generative model has",
            ));
        }
        slots.insert(
            spec.name.clone(),
            GenSlot {
                spec,
                state: GenState::Unloaded,
                last_used: Instant::now(),
            },
        );
        Ok(())
    }

    pub(crate) fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.slots.lock().keys().cloned().collect();
        v.sort();
        v
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.slots.lock().contains_key(name)
    }

    /// `(name, tier)` of each model, sorted by name.
    pub(crate) fn tiers(&self) -> Vec<(String, tier_router::Tier)> {
        let mut v: Vec<_> = self
            .slots
            .lock()
            .iter()
            .map(|(n, s)| (n.clone(), s.spec.tier))
            .collect();
        v.sort();
        v
    }

    /// The loaded decoder, loading it first if need be.
    pub(crate) fn get(&self, name: &str) -> Result<Arc<LoadedDecoder>> {
        let spec = {
            let mut slots = self.slots.lock();
            loop {
                let slot = slots
                    .get_mut(name)
                    .ok_or_else(|| Error::unknown_model(name, Vec::new()))?;
                match &slot.state {
                    GenState::Loaded(l) => {
                        slot.last_used = Instant::now();
                        return Ok(Arc::clone(l));
                    }
                    GenState::Loading => self.changed.wait(&mut slots),
                    GenState::Unloaded => {
                        slot.state = GenState::Loading;
                        break slot.spec.clone();
                    }
                }
            }
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load(&spec)))
            .unwrap_or_else(|_| Err(Error::LoadPanicked(spec.name.clone())));
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get_mut(name) {
            slot.state = match &result {
                Ok(l) => GenState::Loaded(Arc::clone(l)),
                Err(_) => GenState::Unloaded,
            };
            slot.last_used = Instant::now();
        }
        drop(slots);
        self.changed.notify_all();
        result
    }

    fn load(&self, spec: &GenerativeSpec) -> Result<Arc<LoadedDecoder>> {
        let mut engine_cfg = spec.engine.clone();
        engine_cfg.max_step_tokens = engine_cfg.max_step_tokens.min(spec.decoder.max_step_tokens);
        engine_cfg.max_running = engine_cfg.max_running.min(engine_cfg.max_step_tokens);
        engine_cfg.max_prefill_chunk = engine_cfg.max_prefill_chunk.min(engine_cfg.max_step_tokens);
        engine_cfg.thread_name = format!("snug-gen-{}", spec.name);
        // Weights, repacked copies and scratch are reserved now; KV per
        // sequence at admission.
        let bytes = model_bytes(spec, engine_cfg.max_step_tokens, true)?;
        let running_bytes = model_bytes(spec, engine_cfg.max_step_tokens, false)?;
        let reservation = self
            .ledger
            .try_reserve_alone(mem_budget::Category::Model, bytes)
            .map_err(|e| Error::DoesNotFit {
                model: spec.name.clone(),
                tried: vec![("gguf".to_string(), bytes)],
                free: self
                    .ledger
                    .available_for(mem_budget::Category::Model)
                    .unwrap_or(0),
                cap: {
                    let _ = e;
                    self.ledger.cap(mem_budget::Category::Model)
                },
            })?;
        let tokenizer = Arc::new(models::Tokenizer::from_gguf_file(&spec.gguf)?);
        let template = if tokenizer.chat_template().is_some() {
            models::ChatTemplate::from_tokenizer(&tokenizer)?
        } else {
            models::ChatTemplate::plain_fallback()
        };
        let decoder = Arc::new(Decoder::load(&spec.gguf, spec.decoder.clone())?);
        // Loaded: the transient copy of the load is gone.
        let mut reservation = reservation;
        if running_bytes < reservation.bytes() {
            let less = reservation.bytes() - running_bytes;
            reservation.shrink(less);
        }
        let layout = decoder.kv_layout().clone();
        let kv = Arc::new(KvAccount {
            admitted: Mutex::new(0),
            budget: AtomicU64::new(spec.decoder.kv_budget_bytes as u64),
        });
        let counters = Arc::new(GenCounters::default());
        let prefix = PrefixCache::new(&decoder, spec.prefix_cache_bytes, &self.ledger).map(Arc::new);
        let handler = DecoderSteps {
            decoder: Arc::clone(&decoder),
            step_tokens: engine_cfg.max_step_tokens,
            short: 0,
            tokenizer: Arc::clone(&tokenizer),
            ledger: self.ledger.clone(),
            kv: Arc::clone(&kv),
            counters: Arc::clone(&counters),
            monitor: self.monitor.clone(),
            running: 0,
            last_trim: None,
            alone_short_since: None,
            refused: None,
            prefix: prefix.clone(),
        };
        let step_tokens = engine_cfg.max_step_tokens;
        let engine = batcher::ContinuousBatcher::new(engine_cfg, handler)?;
        Ok(Arc::new(LoadedDecoder {
            tokenizer,
            template,
            engine,
            decoder,
            layout,
            step_tokens,
            kv,
            counters,
            reservation: Mutex::new(reservation),
            prefix,
        }))
    }

    /// Unloads `name` if it is loaded and nothing runs on it; returns the
    /// bytes its reservation held.
    pub(crate) fn unload_if_idle(&self, name: &str) -> u64 {
        let taken = {
            let mut slots = self.slots.lock();
            match slots.get_mut(name) {
                Some(slot) => match &slot.state {
                    GenState::Loaded(l)
                        if Arc::strong_count(l) == 1 && {
                            let s = l.engine.stats();
                            s.running == 0 && s.queued == 0
                        } =>
                    {
                        match std::mem::replace(&mut slot.state, GenState::Unloaded) {
                            GenState::Loaded(l) => Some(l),
                            _ => None,
                        }
                    }
                    _ => None,
                },
                None => None,
            }
        };
        taken.map_or(0, |l| {
            let b = l.reservation.lock().bytes();
            drop(l);
            b
        })
    }

    /// Drops every loaded decoder's cached prefixes; returns the bytes of
    /// KV blocks they held.
    pub(crate) fn clear_prefixes(&self) -> u64 {
        let loaded: Vec<Arc<LoadedDecoder>> = self
            .slots
            .lock()
            .values()
            .filter_map(|s| match &s.state {
                GenState::Loaded(l) => Some(Arc::clone(l)),
                _ => None,
            })
            .collect();
        loaded
            .iter()
            .filter_map(|l| l.prefix.as_ref())
            .map(|p| {
                let w = p.weight();
                p.clear();
                w
            })
            .sum()
    }

    /// Unloads every idle decoder (idle at least `idle`); returns bytes freed.
    pub(crate) fn unload_idle(&self, idle: Duration) -> u64 {
        let now = Instant::now();
        let names: Vec<String> = self
            .slots
            .lock()
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_used) >= idle)
            .map(|(n, _)| n.clone())
            .collect();
        names.iter().map(|n| self.unload_if_idle(n)).sum()
    }

    /// Unloads everything (shutdown): running sequences end with an error.
    pub(crate) fn unload_all(&self) {
        let taken: Vec<Arc<LoadedDecoder>> = self
            .slots
            .lock()
            .values_mut()
            .filter_map(
                |s| match std::mem::replace(&mut s.state, GenState::Unloaded) {
                    GenState::Loaded(l) => Some(l),
                    _ => None,
                },
            )
            .collect();
        drop(taken);
    }

    /// The loaded decoders with their specs, sorted by name.
    fn loaded(&self) -> Vec<(GenerativeSpec, Arc<LoadedDecoder>)> {
        let mut v: Vec<_> = self
            .slots
            .lock()
            .values()
            .filter_map(|s| match &s.state {
                GenState::Loaded(l) => Some((s.spec.clone(), Arc::clone(l))),
                _ => None,
            })
            .collect();
        v.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        v
    }

    /// The step and KV budgets of each loaded decoder now.
    pub(crate) fn plans(&self) -> Vec<GenerationPlan> {
        self.loaded()
            .iter()
            .map(|(spec, l)| GenerationPlan {
                model: spec.name.clone(),
                step_tokens: l.engine.max_step_tokens(),
                step_tokens_configured: l.step_tokens,
                kv_budget_bytes: l.kv.budget(),
                kv_budget_configured: spec.decoder.kv_budget_bytes as u64,
                reserved_bytes: l.reservation.lock().bytes(),
            })
            .collect()
    }

    /// Re-plans each loaded decoder's step and KV budgets for `free` bytes
    /// (the machine's available memory less the safety margin) and returns
    /// the budgets now. The rules are in the runtime docs ("Re-planning"):
    ///
    /// - **Steps** hold the configured tokens, half of them under 1 GiB
    ///   free and a quarter under 256 MiB (never fewer than 64, or the
    ///   configured count if smaller), the rule batches of embeddings follow.
    ///   The ledger's reservation for the decoder shrinks to the weights and
    ///   the scratch of the smaller step, and the scratch is freed; it grows
    ///   back only if the ledger has room for it.
    /// - **KV** may hold, over all sequences and the prefix cache, what they
    ///   hold now plus the pool's idle blocks plus what the ledger could
    ///   reserve for activations now (and no more than `free`), never more
    ///   than configured. A request
    ///   whose whole length no longer fits is refused at once with the
    ///   numbers (`auto` goes on to the next tier) instead of waiting;
    ///   running sequences that outgrow it are preempted by the rule of
    ///   KV growth.
    pub(crate) fn replan(&self, free: u64) -> Vec<GenerationPlan> {
        for (spec, l) in self.loaded() {
            let target = step_tokens_for(l.step_tokens, free);
            let now = l.engine.max_step_tokens();
            if target != now {
                let bytes = model_bytes(&spec, target, false);
                match bytes {
                    Ok(bytes) if target < now => {
                        if l.engine.set_max_step_tokens(target).is_ok() {
                            l.decoder.set_scratch_tokens(target);
                            let mut r = l.reservation.lock();
                            let less = r.bytes().saturating_sub(bytes);
                            r.shrink(less);
                        }
                    }
                    Ok(bytes) => {
                        let grown = l.reservation.lock().resize(bytes).is_ok();
                        if grown {
                            l.decoder.set_scratch_tokens(target);
                            if l.engine.set_max_step_tokens(target).is_err() {
                                l.decoder.set_scratch_tokens(now);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(model = %spec.name, error = %e, "could not re-plan the step budget"),
                }
            }
            let held = *l.kv.admitted.lock() + l.prefix.as_ref().map_or(0, |p| p.weight());
            let leased = l.decoder.kv_bytes_in_use() as u64;
            let unleased = held.saturating_sub(leased);
            let idle = (l.decoder.kv_bytes_cached() as u64).saturating_sub(unleased);
            // The ledger's reading of the machine may be a little older
            // than `free`: the lesser of the two.
            let room = self
                .ledger
                .available_for(mem_budget::Category::Activations)
                .unwrap_or(0)
                .min(free);
            let budget = (spec.decoder.kv_budget_bytes as u64).min(held + idle + room);
            l.kv.budget.store(budget, Ordering::Relaxed);
        }
        self.plans()
    }

    pub(crate) fn status(&self) -> Vec<GenerativeStatus> {
        let now = Instant::now();
        let slots = self.slots.lock();
        let mut v: Vec<GenerativeStatus> = slots
            .iter()
            .map(|(name, s)| {
                let (state, loaded) = match &s.state {
                    GenState::Unloaded => ("unloaded", None),
                    GenState::Loading => ("loading", None),
                    GenState::Loaded(l) => ("loaded", Some(l)),
                };
                let mut st = GenerativeStatus {
                    name: name.clone(),
                    tier: s.spec.tier,
                    state,
                    reserved_bytes: 0,
                    running: 0,
                    queued: 0,
                    kv_blocks_used: 0,
                    kv_blocks_free: 0,
                    kv_bytes_admitted: 0,
                    kv_bytes_budget: s.spec.decoder.kv_budget_bytes as u64,
                    tokens_per_second: 0.0,
                    tokens_generated: 0,
                    prompt_tokens: 0,
                    preempted: 0,
                    recomputed_tokens: 0,
                    prefix_lookups: 0,
                    prefix_hits: 0,
                    prefix_tokens_saved: 0,
                    prefix_bytes: 0,
                    idle_secs: now.duration_since(s.last_used).as_secs_f64(),
                    engine: None,
                };
                if let Some(l) = loaded {
                    let e = l.engine.stats();
                    let block = l
                        .layout
                        .groups
                        .iter()
                        .map(|g| g.class_bytes as u64)
                        .min()
                        .unwrap_or(1)
                        .max(1);
                    let prefix_bytes = l.prefix.as_ref().map_or(0, |p| p.weight());
                    let leased = l.decoder.kv_bytes_in_use() as u64;
                    let in_use = leased.saturating_sub(prefix_bytes);
                    st.reserved_bytes = l.reservation.lock().bytes();
                    st.kv_bytes_budget = l.kv.budget();
                    st.running = e.running;
                    st.queued = e.queued;
                    st.kv_blocks_used = l.layout.groups.first().map_or(0, |_| in_use / block);
                    st.kv_blocks_free = l.kv.budget().saturating_sub(leased) / block;
                    st.kv_bytes_admitted = *l.kv.admitted.lock();
                    st.tokens_per_second = l.counters.tokens_per_second();
                    st.tokens_generated = l.counters.generated.load(Ordering::Relaxed);
                    st.prompt_tokens = l.counters.prompt.load(Ordering::Relaxed);
                    st.preempted = l.counters.preempted.load(Ordering::Relaxed);
                    st.recomputed_tokens = l.counters.recomputed.load(Ordering::Relaxed);
                    if let Some(p) = &l.prefix {
                        st.prefix_lookups = p.lookups.load(Ordering::Relaxed);
                        st.prefix_hits = p.hits.load(Ordering::Relaxed);
                        st.prefix_tokens_saved = p.tokens_saved.load(Ordering::Relaxed);
                        st.prefix_bytes = p.weight();
                    }
                    st.engine = Some(e);
                }
                st
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}
