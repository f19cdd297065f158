//! The [`Runtime`] handle: what it holds, its accessors, model control
//! (pin, load, unload, warm-up) and shutdown. Building it is in
//! `builder.rs`, serving in `embed.rs`, reporting in `status.rs`, cleaning
//! up and re-planning in `cleanup.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::builder::RuntimeBuilder;
use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::model::LoadEvent;
use crate::plan::Plan;
use crate::registry::Registry;

/// The name the bundled all-MiniLM-L6-v2 is registered under.
pub const MINILM: &str = "minilm";

pub(crate) type Cache = feature_cache::FeatureCache<String, Arc<Vec<f32>>>;
pub(crate) type EmbedRouter = tier_router::Router<[String], Vec<Vec<f32>>>;

pub(crate) struct Inner {
    pub(crate) config: RuntimeConfig,
    pub(crate) profile: hw_detect::HardwareProfile,
    pub(crate) plan: Mutex<Plan>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) decoders: Arc<crate::decoder::Decoders>,
    pub(crate) monitor: mem_budget::PressureMonitor,
    pub(crate) cache: Cache,
    pub(crate) pool: buffer_pool::BufferPool,
    pub(crate) router: EmbedRouter,
    #[cfg(feature = "remote")]
    pub(crate) remote_generation: Option<Arc<crate::remote::RemoteTier>>,
    pub(crate) default_model: Option<String>,
    pub(crate) dim: usize,
    pub(crate) facts: Option<crate::model::MiniLmFacts>,
    pub(crate) last_emergency: Mutex<Option<Instant>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) background: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) monitor_thread: Mutex<Option<mem_budget::MonitorThread>>,
}

/// The snug runtime: one per program, shared by reference or clone (it is
/// an `Arc` inside).
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("class", &self.inner.profile.class)
            .field("models", &self.inner.registry.names())
            .finish_non_exhaustive()
    }
}

pub(crate) fn rss() -> u64 {
    hw_detect::ProcessMemory::read().map_or(0, |m| m.rss)
}

impl Runtime {
    /// A builder with the defaults: detect the machine, plan from it.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            with_minilm: true,
            ..RuntimeBuilder::default()
        }
    }

    pub(crate) fn start_background(&self) -> Result<()> {
        let inner = &self.inner;
        match inner.monitor.spawn(inner.config.monitor_interval) {
            Ok(t) => *inner.monitor_thread.lock() = Some(t),
            Err(e) => tracing::warn!(error = %e, "pressure monitor thread not started"),
        }
        // Keep-alive: unload models idle past keep_alive.
        let registry = Arc::clone(&inner.registry);
        let decoders = Arc::clone(&inner.decoders);
        let stop = Arc::clone(&inner.stop);
        let keep_alive = inner.config.keep_alive;
        let tick = (keep_alive / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let handle = std::thread::Builder::new()
            .name("snug-keepalive".into())
            .spawn(move || {
                let mut next = Instant::now() + tick;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(tick));
                    if Instant::now() >= next {
                        registry.unload_idle(keep_alive, "idle");
                        decoders.unload_idle(keep_alive);
                        next = Instant::now() + tick;
                    }
                }
            })?;
        inner.background.lock().push(handle);
        Ok(())
    }

    /// The plan: what was chosen for this machine and why.
    pub fn plan(&self) -> Plan {
        let mut plan = self.inner.plan.lock().clone();
        plan.generation = self.inner.decoders.plans();
        plan
    }

    /// The hardware profile the plan was made from.
    pub fn profile(&self) -> &hw_detect::HardwareProfile {
        &self.inner.profile
    }

    /// The configuration the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Length of the vectors `embed` returns.
    pub fn dim(&self) -> usize {
        self.inner.dim
    }

    /// Calls `f` at each stage of every model load and unload.
    pub fn on_load_event(&self, f: impl Fn(&LoadEvent) + Send + Sync + 'static) {
        self.inner.registry.on_load_event(f);
    }

    /// Keeps embedding model `name` loaded: it is never unloaded for being
    /// idle, evicted for another model, or unloaded in an emergency.
    pub fn pin(&self, name: &str) -> Result<()> {
        self.name_errors(self.inner.registry.pin(name, true))
    }

    /// Undoes [`Runtime::pin`].
    pub fn unpin(&self, name: &str) -> Result<()> {
        self.name_errors(self.inner.registry.pin(name, false))
    }

    /// Loads `name` (an embedding or generative model) now; it would
    /// otherwise load on first use.
    pub fn load(&self, name: &str) -> Result<()> {
        if self.inner.decoders.contains(name) {
            return self.inner.decoders.get(name).map(drop);
        }
        self.name_errors(self.inner.registry.get(name).map(drop))
    }

    /// Fills the list of known names into an unknown-model error.
    pub(crate) fn name_errors<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| match e {
            Error::UnknownModel { name, .. } => self.unknown(&name),
            e => e,
        })
    }

    /// Unloads `name`; returns the bytes its reservation held.
    pub fn unload(&self, name: &str) -> u64 {
        self.inner.registry.unload(name, "asked")
    }

    /// Loads `names` on a background thread at low priority. User requests
    /// never wait for it: loads happen outside the registry's lock, the
    /// thread runs at the lowest CPU priority the OS gives, and
    /// `emergency_cleanup` pauses it.
    pub fn warmup(&self, names: &[&str]) -> Result<JoinHandle<Vec<Result<()>>>> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        for n in &names {
            self.name_errors(self.inner.registry.version(n))?;
        }
        let registry = Arc::clone(&self.inner.registry);
        Ok(std::thread::Builder::new()
            .name("snug-warmup".into())
            .spawn(move || {
                lower_thread_priority();
                names
                    .iter()
                    .map(|n| {
                        if registry.warmups_paused.load(Ordering::Relaxed) {
                            return Err(Error::Paused(n.clone()));
                        }
                        registry.get(n).map(drop)
                    })
                    .collect()
            })?)
    }

    /// The embedding cache (for statistics, invalidation and warming).
    pub fn cache(&self) -> &feature_cache::FeatureCache<String, Arc<Vec<f32>>> {
        &self.inner.cache
    }

    /// The memory ledger.
    pub fn ledger(&self) -> &mem_budget::MemoryLedger {
        self.inner.registry.ledger()
    }

    /// The tier router (statistics, breaker states).
    pub fn router(&self) -> &tier_router::Router<[String], Vec<Vec<f32>>> {
        &self.inner.router
    }

    /// The circuit breaker of the remote generation tier, when one is
    /// configured (to read its state or register callbacks).
    #[cfg(feature = "remote")]
    #[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
    pub fn remote_generation_breaker(&self) -> Option<&tier_router::CircuitBreaker> {
        self.inner.remote_generation.as_deref().map(|r| r.breaker())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.background.lock().drain(..) {
            let _ = h.join();
        }
        if let Some(t) = self.monitor_thread.lock().take() {
            t.stop();
        }
        for name in self.registry.names() {
            self.registry.unload(&name, "shutdown");
        }
        self.decoders.unload_all();
    }
}

fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's id only changes its nice value.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}
