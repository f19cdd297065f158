//! Freeing memory in an emergency ([`CleanupReport`]) and re-planning for
//! the memory free now ([`Reoptimized`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::plan::{Plan, Sizes};
use crate::runtime::{rss, Runtime};

/// What `emergency_cleanup` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CleanupReport {
    /// Resident memory before, bytes (Linux; else 0).
    pub rss_before: u64,
    /// Resident memory after, bytes.
    pub rss_after: u64,
    /// Cache entries dropped.
    pub cache_entries_cleared: usize,
    /// Bytes the cache held before.
    pub cache_bytes_cleared: u64,
    /// Bytes the pool released.
    pub pool_bytes_released: u64,
    /// Models unloaded.
    pub models_unloaded: Vec<String>,
    /// Bytes of reservations released by unloading.
    pub reserved_bytes_released: u64,
    /// Bytes of KV blocks the decoders' prefix caches held.
    pub prefix_bytes_cleared: u64,
}

/// What `reoptimize` decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Reoptimized {
    /// The plan already suits the memory free now.
    Optimal,
    /// The plan changed.
    Adjusted {
        /// The plan before.
        previous: Box<Plan>,
        /// The plan now.
        new: Box<Plan>,
    },
}

/// Returns freed heap memory to the OS where the allocator allows.
pub(crate) fn release_to_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap and takes its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Fixes malloc's mmap threshold (and its trim threshold) at `bytes`, so that
/// every allocation at least that large is mapped on its own and unmapped when
/// freed; glibc otherwise raises the threshold after each large free. Returns
/// whether the allocator took the setting.
pub(crate) fn fix_mmap_threshold(bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Ok(v) = libc::c_int::try_from(bytes) else {
            return false;
        };
        // SAFETY: mallopt only sets glibc's own parameters under its lock.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, v) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, v) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}

impl Runtime {
    /// Frees what can be freed now: pauses warm-ups, clears the cache,
    /// shrinks the pool to 25%, drops the decoders' cached prefixes, unloads
    /// idle unpinned models and decoders and returns
    /// freed heap to the OS. At most once per `emergency_min_interval`.
    pub fn emergency_cleanup(&self) -> Result<CleanupReport> {
        let inner = &self.inner;
        {
            let mut last = inner.last_emergency.lock();
            if let Some(at) = *last {
                let since = at.elapsed();
                if since < inner.config.emergency_min_interval {
                    return Err(Error::RateLimited {
                        retry_after: inner.config.emergency_min_interval - since,
                    });
                }
            }
            *last = Some(Instant::now());
        }
        let rss_before = rss();
        inner.registry.warmups_paused.store(true, Ordering::Relaxed);
        let cache_stats = inner.cache.stats();
        inner.cache.clear();
        let pool_released = match inner.pool.shrink_to(0.25) {
            Ok(r) => r.bytes as u64,
            Err(e) => {
                tracing::warn!(error = %e, "pool not shrunk");
                0
            }
        };
        let loaded = || -> Vec<String> {
            let models = inner.registry.status().into_iter();
            let mut v: Vec<String> = models
                .filter(|m| m.state == "loaded")
                .map(|m| m.name)
                .collect();
            v.extend(
                inner
                    .decoders
                    .status()
                    .into_iter()
                    .filter(|m| m.state == "loaded")
                    .map(|m| m.name),
            );
            v
        };
        let prefix_bytes_cleared = inner.decoders.clear_prefixes();
        let before = loaded();
        let released = inner.registry.unload_idle(Duration::ZERO, "emergency")
            + inner.decoders.unload_idle(Duration::ZERO);
        let after = loaded();
        release_to_os();
        let report = CleanupReport {
            rss_before,
            rss_after: rss(),
            cache_entries_cleared: cache_stats.entries as usize,
            cache_bytes_cleared: cache_stats.weight,
            pool_bytes_released: pool_released,
            models_unloaded: before.into_iter().filter(|m| !after.contains(m)).collect(),
            reserved_bytes_released: released,
            prefix_bytes_cleared,
        };
        inner
            .registry
            .warmups_paused
            .store(false, Ordering::Relaxed);
        tracing::warn!(?report, "emergency cleanup");
        Ok(report)
    }

    /// Re-plans from the memory free now, applied at once: batch tokens,
    /// cache capacity and the longest input of embeddings, and each loaded
    /// generative model's step budget (its scratch, released to the ledger
    /// when the step shrinks) and KV budget (what its sequences may hold
    /// together). The rules are in the runtime docs under "Re-planning";
    /// [`Plan::generation`] shows the budgets now.
    ///
    /// Call it when the memory free has changed (a pressure hook, a timer,
    /// the server's `POST /optimize-for-hardware`): a KV budget lowered by a
    /// shortage rises again only when it is called once memory is back.
    pub fn reoptimize(&self) -> Result<Reoptimized> {
        let inner = &self.inner;
        let memory = inner.registry.ledger().probe().memory()?;
        let previous = self.plan();
        let mut new = previous.clone();
        new.memory_available = memory.effective_available;
        let memory_facts = inner.facts.as_ref().map(|f| &f.memory);
        let pending = match (&inner.default_model, memory_facts) {
            (Some(m), Some(f)) if !inner.registry.is_loaded_or_loading(m) => f.weights,
            _ => 0,
        };
        let sizes = Sizes::for_memory(
            &inner.config,
            inner.registry.ledger().budget(),
            memory.effective_available,
            memory_facts,
            pending,
        );
        new.cache_bytes = sizes.cache_bytes;
        new.batch_tokens = sizes.batch_tokens;
        new.max_input_tokens = sizes.max_input_tokens;
        let free = sizes.free;
        new.reasons = vec![format!("re-planned for {} MiB free", free >> 20)];
        new.generation = inner.decoders.replan(free);
        for (g, before) in new.generation.iter().map(|g| {
            (g, previous.generation.iter().find(|p| p.model == g.model))
        }) {
            if before != Some(g) {
                new.reasons.push(format!(
                    "{}: steps of at most {} tokens (configured {}), KV budget {} MiB (configured {} MiB)",
                    g.model,
                    g.step_tokens,
                    g.step_tokens_configured,
                    g.kv_budget_bytes >> 20,
                    g.kv_budget_configured >> 20
                ));
            }
        }
        let changed = new.cache_bytes != previous.cache_bytes
            || new.batch_tokens != previous.batch_tokens
            || new.max_input_tokens != previous.max_input_tokens
            || new.generation != previous.generation;
        if !changed {
            inner.plan.lock().memory_available = memory.effective_available;
            return Ok(Reoptimized::Optimal);
        }
        inner.cache.set_capacity(new.cache_bytes);
        inner.registry.set_batch_tokens(new.batch_tokens);
        let mut stored = new.clone();
        stored.generation.clear(); // `plan()` reads it live
        *inner.plan.lock() = stored;
        Ok(Reoptimized::Adjusted {
            previous: Box::new(previous),
            new: Box::new(new),
        })
    }
}
