//! Prefix reuse: the KV blocks of prompts' prefixes (a system prompt, a chat
//! history) kept in a `feature-cache` for later sequences that start with
//! the same tokens, so those tokens are not computed again.
//!
//! A prompt is cut into units of the decoder's
//! [`prefix_unit`](models::decoder::Decoder::prefix_unit) positions (whole
//! KV blocks). Unit `k` is keyed by a hash chain: the hash of unit `k - 1`'s
//! key and unit `k`'s tokens, so a key names the whole prefix up to it. Each
//! entry holds that unit's blocks (shared with the sequences using them:
//! reference counted, returned to the KV pool when the last holder lets
//! go) and weighs their bytes; the cache evicts the least recently used
//! entries past its capacity. A new sequence looks its prompt's units up in
//! order and starts after the longest run found, always leaving at least one
//! prompt token to compute (its logits pick the first token).
//!
//! The cache holds a ledger reservation of its weight (category
//! `Activations`): a piece is cached only when the ledger grants its bytes,
//! and the reservation shrinks as entries leave.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use feature_cache::{FeatureCache, Policy};
use models::decoder::{Decoder, Sequence, SharedPrefix};
use parking_lot::Mutex;

/// One unit of a cached prefix: its tokens (checked on every hit) and its
/// shared KV blocks.
#[derive(Debug)]
struct Piece {
    tokens: Vec<u32>,
    kv: SharedPrefix,
}

/// The prefix cache of one decoder.
pub(crate) struct PrefixCache {
    unit: usize,
    capacity: u64,
    cache: FeatureCache<u64, Arc<Piece>>,
    /// The ledger's hold on the cache's weight.
    reservation: Mutex<mem_budget::Reservation>,
    /// Sequences that looked their prompt up.
    pub(crate) lookups: AtomicU64,
    /// Of those, the ones that started after a cached prefix.
    pub(crate) hits: AtomicU64,
    /// Prompt tokens not computed thanks to a cached prefix.
    pub(crate) tokens_saved: AtomicU64,
}

impl std::fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache")
            .field("unit", &self.unit)
            .field("capacity", &self.capacity)
            .field("weight", &self.cache.weight())
            .finish_non_exhaustive()
    }
}

fn chain(tokens: &[u32], unit: usize, units: usize) -> Vec<u64> {
    let mut keys = Vec::with_capacity(units);
    let mut previous = 0u64;
    for k in 0..units {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        previous.hash(&mut h);
        tokens[k * unit..(k + 1) * unit].hash(&mut h);
        previous = h.finish();
        keys.push(previous);
    }
    keys
}

impl PrefixCache {
    /// A cache of at most `capacity` bytes of KV blocks for `decoder`;
    /// `None` where the decoder cannot share prefixes (a sliding window) or
    /// `capacity` is 0.
    pub(crate) fn new(
        decoder: &Decoder,
        capacity: u64,
        ledger: &mem_budget::MemoryLedger,
    ) -> Option<PrefixCache> {
        let unit = decoder.prefix_unit()?;
        if capacity == 0 {
            return None;
        }
        let reservation = ledger
            .try_reserve(mem_budget::Category::Activations, 0)
            .ok()?;
        let cache = FeatureCache::builder()
            .capacity(capacity)
            .shards(1)
            .policy(Policy::Lru)
            .weigher(|_: &u64, p: &Arc<Piece>| p.kv.bytes() as u64)
            .build()
            .ok()?;
        Some(PrefixCache {
            unit,
            capacity,
            cache,
            reservation: Mutex::new(reservation),
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            tokens_saved: AtomicU64::new(0),
        })
    }

    /// The longest cached prefix of `feed` that leaves at least one token
    /// of it to compute, joined from its units.
    pub(crate) fn lookup(&self, feed: &[u32]) -> Option<SharedPrefix> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let units = feed.len().saturating_sub(1) / self.unit;
        let mut pieces = Vec::new();
        for (k, key) in chain(feed, self.unit, units).into_iter().enumerate() {
            let Some(p) = self.cache.get(&key) else {
                break;
            };
            if p.tokens[..] != feed[k * self.unit..(k + 1) * self.unit] || p.kv.start() != k * self.unit {
                break;
            }
            pieces.push(p.kv.clone());
        }
        let prefix = SharedPrefix::join(&pieces)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.tokens_saved
            .fetch_add(prefix.tokens() as u64, Ordering::Relaxed);
        Some(prefix)
    }

    /// Offers the whole units of `prompt` that `seq` has cached: the ones
    /// not in the cache yet are shared and inserted.
    pub(crate) fn offer(&self, decoder: &Decoder, seq: &mut Sequence, prompt: &[u32]) {
        let units = prompt.len().min(seq.len()) / self.unit;
        if units == 0 {
            return;
        }
        let keys = chain(prompt, self.unit, units);
        if keys.iter().all(|k| self.cache.contains(k)) {
            return;
        }
        let Some(pieces) = decoder
            .share_prefix(seq, units * self.unit)
            .and_then(|p| p.pieces(decoder.kv_layout(), self.unit))
        else {
            return;
        };
        for (k, (key, kv)) in keys.into_iter().zip(pieces).enumerate() {
            if self.cache.contains(&key) {
                continue;
            }
            let mut held = self.reservation.lock();
            // Cached only with the ledger's leave; otherwise nothing is lost
            // but the reuse.
            if held.grow(kv.bytes() as u64).is_err() {
                break;
            }
            let piece = Piece {
                tokens: prompt[k * self.unit..(k + 1) * self.unit].to_vec(),
                kv,
            };
            // A piece larger than the whole capacity is refused: nothing lost.
            let _ = self.cache.insert(key, Arc::new(piece));
            let _ = held.resize(self.cache.weight());
        }
    }

    /// Bytes of KV blocks the cache holds (some may be shared with running
    /// sequences too).
    pub(crate) fn weight(&self) -> u64 {
        self.cache.weight()
    }

    /// Evicts the least recently used entries until at least `bytes` are
    /// gone or the cache is empty.
    pub(crate) fn shrink_by(&self, bytes: u64) {
        let mut held = self.reservation.lock();
        let weight = self.cache.weight();
        self.cache.set_capacity(weight.saturating_sub(bytes));
        self.cache.set_capacity(self.capacity);
        let _ = held.resize(self.cache.weight());
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        let mut held = self.reservation.lock();
        self.cache.clear();
        let _ = held.resize(self.cache.weight());
    }
}
