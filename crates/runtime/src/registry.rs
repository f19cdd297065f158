//! The model registry: lazy loads within the memory budget, eviction of idle
//! models, pinning, keep-alive and background warm-up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use serde::Serialize;

use crate::config::BatchSettings;
use crate::error::{Error, Result};
use crate::model::{EmbeddingModel, LoadContext, LoadEvent, ModelSpec, Tokens};

/// The batcher every loaded model serves through.
pub(crate) type ModelBatcher = batcher::Batcher<Tokens, Vec<f32>, Arc<models::Error>>;

/// A model in memory, with its batcher and its reservation. Dropping the
/// last handle stops the batcher (queued requests are drained) and releases
/// the reservation.
pub(crate) struct Loaded {
    pub(crate) model: Arc<dyn EmbeddingModel>,
    pub(crate) batcher: ModelBatcher,
    pub(crate) variant: String,
    pub(crate) resident: u64,
    reservation: mem_budget::Reservation,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("variant", &self.variant)
            .field("resident", &self.resident)
            .field("reserved", &self.reservation.bytes())
            .finish_non_exhaustive()
    }
}

enum State {
    Unloaded,
    Loading,
    Loaded(Arc<Loaded>),
}

struct Slot {
    spec: ModelSpec,
    state: State,
    pinned: bool,
    last_used: Instant,
}

/// How a registered model stands, for [`Status`](crate::Status).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelStatus {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// `loaded`, `loading` or `unloaded`.
    pub state: &'static str,
    /// The variant loaded, if any.
    pub variant: Option<String>,
    /// Bytes reserved in the ledger for it.
    pub reserved_bytes: u64,
    /// Bytes its weights occupy (as the model reports).
    pub resident_bytes: u64,
    /// Whether it is pinned (never unloaded for being idle).
    pub pinned: bool,
    /// Seconds since it last served.
    pub idle_secs: f64,
    /// Its batcher's statistics, when loaded.
    pub batcher: Option<batcher::BatcherStats>,
}

type Listener = Arc<dyn Fn(&LoadEvent) + Send + Sync>;

pub(crate) struct Registry {
    ledger: mem_budget::MemoryLedger,
    /// The model cap was set in the configuration: it binds even a lone
    /// model. Otherwise it only shares memory among models that compete.
    model_cap_explicit: bool,
    batch: BatchSettings,
    batch_tokens: AtomicU64,
    slots: Mutex<HashMap<String, Slot>>,
    loaded_changed: Condvar,
    listeners: RwLock<Vec<Listener>>,
    pub(crate) warmups_paused: AtomicBool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "models",
                &self.slots.lock().keys().cloned().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub(crate) fn new(
        ledger: mem_budget::MemoryLedger,
        batch: BatchSettings,
        model_cap_explicit: bool,
    ) -> Self {
        Registry {
            ledger,
            model_cap_explicit,
            batch_tokens: AtomicU64::new(batch.max_batch_tokens),
            batch,
            slots: Mutex::new(HashMap::new()),
            loaded_changed: Condvar::new(),
            listeners: RwLock::new(Vec::new()),
            warmups_paused: AtomicBool::new(false),
        }
    }

    pub(crate) fn on_load_event(&self, f: impl Fn(&LoadEvent) + Send + Sync + 'static) {
        self.listeners.write().push(Arc::new(f));
    }

    fn emit(&self, event: LoadEvent) {
        tracing::info!(?event, "model load");
        for l in self.listeners.read().iter() {
            l(&event);
        }
    }

    pub(crate) fn register(&self, spec: ModelSpec) -> Result<()> {
        if spec.variants.is_empty() {
            return Err(Error::invalid(
                "variants",
                format!("none for model {:?}", spec.name),
                "at least one variant to load",
            ));
        }
        let mut slots = self.slots.lock();
        if slots.contains_key(&spec.name) {
            return Err(Error::invalid(
                "name",
                spec.name.clone(),
                "a name no other model has",
            ));
        }
        slots.insert(
            spec.name.clone(),
            Slot {
                spec,
                state: State::Unloaded,
                pinned: false,
                last_used: Instant::now(),
            },
        );
        Ok(())
    }

    pub(crate) fn version(&self, name: &str) -> Result<String> {
        self.slots
            .lock()
            .get(name)
            .map(|s| s.spec.version.clone())
            .ok_or_else(|| Error::unknown_model(name, Vec::new()))
    }

    /// The smallest estimate among a model's variants.
    pub(crate) fn smallest_estimate(&self, name: &str) -> Option<u64> {
        self.slots
            .lock()
            .get(name)
            .and_then(|s| s.spec.variants.iter().map(|v| v.estimate).min())
    }

    /// The variant `name` is loaded in, if it is loaded.
    pub(crate) fn loaded_variant(&self, name: &str) -> Option<String> {
        match self.slots.lock().get(name).map(|s| &s.state) {
            Some(State::Loaded(l)) => Some(l.variant.clone()),
            _ => None,
        }
    }

    /// Whether `name` is loaded or being loaded: either way its memory is
    /// (being) reserved, so a request for it need not fit on top.
    pub(crate) fn is_loaded_or_loading(&self, name: &str) -> bool {
        matches!(
            self.slots.lock().get(name).map(|s| &s.state),
            Some(State::Loaded(_) | State::Loading)
        )
    }

    pub(crate) fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.slots.lock().keys().cloned().collect();
        v.sort();
        v
    }

    pub(crate) fn pin(&self, name: &str, pinned: bool) -> Result<()> {
        let mut slots = self.slots.lock();
        let slot = slots
            .get_mut(name)
            .ok_or_else(|| Error::unknown_model(name, Vec::new()))?;
        slot.pinned = pinned;
        Ok(())
    }

    /// The loaded model, loading it first if need be (one load at a time
    /// per model: concurrent callers wait for it).
    pub(crate) fn get(&self, name: &str) -> Result<Arc<Loaded>> {
        let spec = {
            let mut slots = self.slots.lock();
            loop {
                let slot = slots
                    .get_mut(name)
                    .ok_or_else(|| Error::unknown_model(name, Vec::new()))?;
                match &slot.state {
                    State::Loaded(l) => {
                        slot.last_used = Instant::now();
                        return Ok(Arc::clone(l));
                    }
                    State::Loading => self.loaded_changed.wait(&mut slots),
                    State::Unloaded => {
                        slot.state = State::Loading;
                        break slot.spec.clone();
                    }
                }
            }
        };
        // Load outside the lock: other models keep serving meanwhile.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load(&spec)))
            .unwrap_or_else(|_| Err(Error::LoadPanicked(spec.name.clone())));
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get_mut(name) {
            slot.state = match &result {
                Ok(l) => State::Loaded(Arc::clone(l)),
                Err(_) => State::Unloaded,
            };
            slot.last_used = Instant::now();
        }
        drop(slots);
        self.loaded_changed.notify_all();
        if let Err(e) = &result {
            self.emit(LoadEvent::Failed {
                model: spec.name.clone(),
                error: e.to_string(),
            });
        }
        result
    }

    fn load(&self, spec: &ModelSpec) -> Result<Arc<Loaded>> {
        let started = Instant::now();
        let mut tried = Vec::new();
        for variant in &spec.variants {
            let reservation = match self.reserve_evicting(&spec.name, variant.estimate) {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(model = %spec.name, variant = %variant.label, error = %e, "variant does not fit");
                    tried.push((variant.label.clone(), variant.estimate));
                    continue;
                }
            };
            self.emit(LoadEvent::Reading {
                model: spec.name.clone(),
                variant: variant.label.clone(),
                reserved: reservation.bytes(),
            });
            let emit = |e: LoadEvent| self.emit(e);
            let ctx = LoadContext {
                model: &spec.name,
                emit: &emit,
            };
            let model = variant.load(&ctx)?;
            self.emit(LoadEvent::Warming {
                model: spec.name.clone(),
            });
            // Forwards build candle's repacked weights now, not on the first
            // user request: one of a few tokens (GEMV paths) and one of more
            // than 32 rows (the batched paths, which build their own copies).
            let long = ["warm up the batched paths"; 8].join(" ");
            for text in ["warm up", long.as_str()] {
                let warm = model.tokenize(&[text])?;
                model.embed_tokens(&warm)?;
            }
            let batcher = self.start_batcher(&spec.name, Arc::clone(&model))?;
            let resident = model.resident_bytes();
            self.emit(LoadEvent::Ready {
                model: spec.name.clone(),
                resident,
                millis: started.elapsed().as_millis() as u64,
            });
            return Ok(Arc::new(Loaded {
                model,
                batcher,
                variant: variant.label.clone(),
                resident,
                reservation,
            }));
        }
        let stats = self.ledger.stats();
        Err(Error::DoesNotFit {
            model: spec.name.clone(),
            tried,
            free: self
                .ledger
                .available_for(mem_budget::Category::Model)
                .unwrap_or(0),
            cap: stats.category(mem_budget::Category::Model).cap,
        })
    }

    fn start_batcher(&self, name: &str, model: Arc<dyn EmbeddingModel>) -> Result<ModelBatcher> {
        let b = &self.batch;
        let config = batcher::BatcherConfig {
            max_batch_size: b.max_batch_size,
            max_batch_weight: self
                .batch_tokens
                .load(Ordering::Relaxed)
                .max(model.max_tokens() as u64),
            max_delay: b.max_delay,
            wait_when_idle: b.wait_when_idle,
            max_queued: b.max_queued,
            max_concurrent_batches: b.workers.max(1),
            thread_name: format!("snug-{name}"),
            ..batcher::BatcherConfig::default()
        };
        let mut builder = batcher::BatcherBuilder::new(config).weigher(|t: &Tokens| t.len() as u64);
        if let Some(bucket) = b.bucket_tokens.filter(|&n| n > 0) {
            builder = builder.bucket_by(move |t: &Tokens| t.len() as u64 / bucket);
        }
        let batcher = builder
            .build(move |_worker| {
                let model = Arc::clone(&model);
                move |batch: Vec<Tokens>| -> Vec<Result<Vec<f32>, Arc<models::Error>>> {
                    match model.embed_tokens(&batch) {
                        Ok(vectors) => vectors.into_iter().map(Ok).collect(),
                        Err(e) => {
                            let e = Arc::new(e);
                            batch.iter().map(|_| Err(Arc::clone(&e))).collect()
                        }
                    }
                }
            })
            .map_err(|e| {
                Error::invalid(
                    "batch",
                    format!("{name}: {e}"),
                    "a valid batcher configuration",
                )
            })?;
        Ok(batcher)
    }

    /// Reserves `bytes` for `name`, unloading idle unpinned models (least
    /// recently used first) while the ledger refuses. Unless the model cap
    /// was configured, a model alone in the ledger is held to what the
    /// machine and the overall cap allow, not to the model cap.
    fn reserve_evicting(&self, name: &str, bytes: u64) -> Result<mem_budget::Reservation> {
        loop {
            let attempt = if self.model_cap_explicit {
                self.ledger.try_reserve(mem_budget::Category::Model, bytes)
            } else {
                self.ledger
                    .try_reserve_alone(mem_budget::Category::Model, bytes)
            };
            match attempt {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let victim = {
                        let slots = self.slots.lock();
                        slots
                            .iter()
                            .filter(|(n, s)| n.as_str() != name && !s.pinned)
                            .filter_map(|(n, s)| match &s.state {
                                // Only models no request holds right now.
                                State::Loaded(l) if Arc::strong_count(l) == 1 => {
                                    Some((n.clone(), s.last_used))
                                }
                                _ => None,
                            })
                            .min_by_key(|(_, used)| *used)
                            .map(|(n, _)| n)
                    };
                    match victim {
                        Some(v) => {
                            self.unload(&v, &format!("evicted for {name}"));
                        }
                        None => return Err(e.into()),
                    }
                }
            }
        }
    }

    /// Unloads `name` if it is loaded. Returns the bytes its reservation
    /// held (released once no request holds the model).
    pub(crate) fn unload(&self, name: &str, reason: &str) -> u64 {
        let taken = {
            let mut slots = self.slots.lock();
            match slots.get_mut(name) {
                Some(slot) if matches!(slot.state, State::Loaded(_)) => {
                    match std::mem::replace(&mut slot.state, State::Unloaded) {
                        State::Loaded(l) => Some(l),
                        _ => None,
                    }
                }
                _ => None,
            }
        };
        let Some(loaded) = taken else { return 0 };
        let bytes = loaded.reservation.bytes();
        drop(loaded);
        self.emit(LoadEvent::Unloaded {
            model: name.to_string(),
            reason: reason.to_string(),
        });
        bytes
    }

    /// Unloads unpinned models idle for at least `idle` that no request holds.
    pub(crate) fn unload_idle(&self, idle: Duration, reason: &str) -> u64 {
        let now = Instant::now();
        let victims: Vec<String> = self
            .slots
            .lock()
            .iter()
            .filter(|(_, s)| !s.pinned && now.duration_since(s.last_used) >= idle)
            .filter(|(_, s)| matches!(&s.state, State::Loaded(l) if Arc::strong_count(l) == 1))
            .map(|(n, _)| n.clone())
            .collect();
        victims.iter().map(|v| self.unload(v, reason)).sum()
    }

    pub(crate) fn set_batch_tokens(&self, tokens: u64) {
        self.batch_tokens.store(tokens, Ordering::Relaxed);
        for slot in self.slots.lock().values() {
            if let State::Loaded(l) = &slot.state {
                let floor = l.model.max_tokens() as u64;
                if let Err(e) = l.batcher.set_max_batch_weight(tokens.max(floor)) {
                    tracing::warn!(error = %e, "could not lower the batch weight");
                }
            }
        }
    }

    pub(crate) fn status(&self) -> Vec<ModelStatus> {
        let now = Instant::now();
        let slots = self.slots.lock();
        let mut out: Vec<ModelStatus> = slots
            .iter()
            .map(|(name, s)| {
                let (state, loaded) = match &s.state {
                    State::Loaded(l) => ("loaded", Some(l)),
                    State::Loading => ("loading", None),
                    State::Unloaded => ("unloaded", None),
                };
                ModelStatus {
                    name: name.clone(),
                    version: s.spec.version.clone(),
                    state,
                    variant: loaded.map(|l| l.variant.clone()),
                    reserved_bytes: loaded.map_or(0, |l| l.reservation.bytes()),
                    resident_bytes: loaded.map_or(0, |l| l.resident),
                    pinned: s.pinned,
                    idle_secs: now.duration_since(s.last_used).as_secs_f64(),
                    batcher: loaded.map(|l| l.batcher.stats()),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub(crate) fn ledger(&self) -> &mem_budget::MemoryLedger {
        &self.ledger
    }
}
