//! The reservation ledger: RAII reservations admitted against the budget's
//! caps and the machine's live free memory.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw_detect::{Detector, HardwareProfile, MemoryProbe};
use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::units::Bytes;

/// What a reservation is for; each category has its own cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Model weights and the runtime's copies of them (capped by `max_model`).
    Model,
    /// Caches (capped by `max_cache`).
    Cache,
    /// Scratch buffers (capped by `max_buffers`, else only the overall cap).
    Buffers,
    /// Activations of running requests (capped by `max_activations`, else
    /// only the overall cap).
    Activations,
}

impl Category {
    /// Every category, in index order.
    pub const ALL: [Category; 4] = [
        Category::Model,
        Category::Cache,
        Category::Buffers,
        Category::Activations,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The category's name in lower case.
    pub fn name(self) -> &'static str {
        match self {
            Category::Model => "model",
            Category::Cache => "cache",
            Category::Buffers => "buffers",
            Category::Activations => "activations",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            Category::Model => "choose a smaller quantization (int4) or a smaller model tier, or unload idle models",
            Category::Cache => "clear or shrink the cache",
            Category::Buffers => "lower concurrency or wait for buffers to be released",
            Category::Activations => "reduce the batch size or the input length",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the ledger consults the machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LedgerConfig {
    /// A machine reading younger than this is reused for admission instead of
    /// probing again; bytes reserved since the reading count as taken.
    /// `0` probes on every reservation. Default 50 ms.
    pub probe_max_age_ms: u64,
    /// Whether admission checks the machine's available memory at all
    /// (`false`: the budget's caps only). Default `true`.
    pub check_machine: bool,
    /// While `reserve_timeout` waits on a machine-limited refusal it
    /// rechecks at least this often, since the machine frees memory without
    /// telling the ledger. Default 10 ms.
    pub blocking_recheck_ms: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            probe_max_age_ms: 50,
            check_machine: true,
            blocking_recheck_ms: 10,
        }
    }
}

/// Use, cap and high-water mark of one category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CategoryStats {
    /// The category.
    pub category: Category,
    /// Bytes reserved now.
    pub used: u64,
    /// The category's cap.
    pub cap: u64,
    /// The most ever reserved at once.
    pub high_water: u64,
}

/// A snapshot of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerStats {
    /// One entry per category, in [`Category::ALL`] order.
    pub categories: Vec<CategoryStats>,
    /// Bytes reserved now, all categories.
    pub used: u64,
    /// The overall cap.
    pub cap: u64,
    /// The most ever reserved at once, all categories.
    pub high_water: u64,
    /// Reservations refused so far (a blocking wait counts once).
    pub refusals: u64,
    /// Reservations alive now.
    pub live: u64,
}

impl LedgerStats {
    /// The entry for `category`.
    pub fn category(&self, category: Category) -> &CategoryStats {
        &self.categories[category.index()]
    }
}

#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    available: u64,
    used_at_reading: u64,
}

#[derive(Debug, Default)]
struct State {
    used: [u64; 4],
    high: [u64; 4],
    total: u64,
    total_high: u64,
    refusals: u64,
    live: u64,
    reading: Option<Reading>,
}

#[derive(Debug)]
struct Inner {
    budget: Budget,
    caps: [u64; 4],
    overall_cap: u64,
    probe: Arc<dyn MemoryProbe>,
    config: LedgerConfig,
    state: Mutex<State>,
    released: Condvar,
}

/// Reservations of memory by category, admitted against the budget's caps
/// and the machine's live available memory.
///
/// Cheap to clone: clones share one ledger. A [`Reservation`] gives its bytes
/// back when dropped.
///
/// ```
/// use mem_budget::{Budget, Category, MemoryLedger, GIB};
/// use hw_detect::{HardwareClass, MemoryInfo, MemoryProbe};
///
/// #[derive(Debug)]
/// struct Plenty;
/// impl MemoryProbe for Plenty {
///     fn memory(&self) -> hw_detect::Result<MemoryInfo> {
///         Ok(MemoryInfo::new(8 * GIB, 6 * GIB, 0, 0, None))
///     }
/// }
///
/// let ledger = MemoryLedger::new(Budget::for_class(HardwareClass::AppleM1Air, 8 * GIB), Plenty);
/// let model = ledger.try_reserve(Category::Model, GIB)?;
/// assert_eq!(ledger.stats().category(Category::Model).used, GIB);
/// // The model cap is 2 GiB: another 1.5 GiB is refused, with the reason.
/// let err = ledger.try_reserve(Category::Model, 3 * GIB / 2).unwrap_err();
/// assert!(err.to_string().contains("1.00 GiB is free under the model cap"));
/// drop(model);
/// assert_eq!(ledger.stats().used, 0);
/// # Ok::<(), mem_budget::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct MemoryLedger {
    inner: Arc<Inner>,
}

enum Limit {
    Category,
    Overall,
    Machine,
}

impl MemoryLedger {
    /// A ledger for `budget`, admitting against `probe`'s live readings.
    pub fn new(budget: Budget, probe: impl MemoryProbe + 'static) -> MemoryLedger {
        MemoryLedger::with_config(budget, Arc::new(probe), LedgerConfig::default())
    }

    /// A ledger with a shared probe and explicit configuration.
    pub fn with_config(
        budget: Budget,
        probe: Arc<dyn MemoryProbe>,
        config: LedgerConfig,
    ) -> MemoryLedger {
        let overall_cap = budget.overall_cap();
        let caps = [
            budget.max_model,
            budget.max_cache,
            budget.max_buffers.unwrap_or(overall_cap),
            budget.max_activations.unwrap_or(overall_cap),
        ];
        MemoryLedger {
            inner: Arc::new(Inner {
                budget,
                caps,
                overall_cap,
                probe,
                config,
                state: Mutex::new(State::default()),
                released: Condvar::new(),
            }),
        }
    }

    /// A ledger for this machine: its profile's default budget, admitting
    /// against `hw_detect::Detector`'s live readings.
    pub fn for_this_machine() -> Result<MemoryLedger> {
        let profile = HardwareProfile::detect()?;
        Ok(MemoryLedger::new(
            Budget::from_profile(&profile),
            Detector::new(),
        ))
    }

    /// The budget this ledger enforces.
    pub fn budget(&self) -> &Budget {
        &self.inner.budget
    }

    /// The cap of `category`.
    pub fn cap(&self, category: Category) -> u64 {
        self.inner.caps[category.index()]
    }

    /// The probe admission consults.
    pub fn probe(&self) -> &Arc<dyn MemoryProbe> {
        &self.inner.probe
    }

    /// Reserves `bytes` for `category` now, or says why not.
    ///
    /// Refused when the category's cap or the overall cap would be exceeded,
    /// or when the machine's available memory less the safety margin (and
    /// less what was reserved since the last reading) is smaller than
    /// `bytes`. A reservation of zero bytes always succeeds.
    pub fn try_reserve(&self, category: Category, bytes: u64) -> Result<Reservation> {
        let mut st = self.inner.state.lock();
        match self.inner.admit(&mut st, category, bytes) {
            Ok(()) => Ok(self.reservation(category, bytes)),
            Err(e) => {
                if e.is_refusal() {
                    st.refusals += 1;
                }
                drop(st);
                tracing::debug!(%category, bytes, error = %e, "reservation refused");
                Err(e)
            }
        }
    }

    /// Reserves `bytes` for `category` as [`MemoryLedger::try_reserve`]
    /// does, where up to `resident` of those bytes will come from memory the
    /// process already holds and no reservation counts (a pool's idle
    /// buffers, which the next lease reuses): the machine's reading counts
    /// them as used already, so only the rest is asked of the machine. The
    /// category's and the overall caps apply to all `bytes`, and all of them
    /// are booked.
    ///
    /// Without this, memory a pool keeps after its leases end would be
    /// counted twice, once in the reading and once more when a new lease
    /// asks for it, and a process near its limit could never reuse it.
    ///
    /// ```
    /// use mem_budget::{Budget, Category, MemoryLedger, GIB, MIB};
    /// # #[derive(Debug)] struct Tight;
    /// # impl hw_detect::MemoryProbe for Tight {
    /// #     fn memory(&self) -> hw_detect::Result<hw_detect::MemoryInfo> {
    /// #         // 8 GiB, of which little is free (the margin takes most of it).
    /// #         Ok(hw_detect::MemoryInfo::new(8 * GIB, 420 * MIB, 0, 0, None))
    /// #     }
    /// # }
    /// let ledger = MemoryLedger::new(Budget::for_class(hw_detect::HardwareClass::Generic, 8 * GIB), Tight);
    /// let free = ledger.available_for(Category::Activations)?;
    /// // More than the machine has free is refused...
    /// assert!(ledger.try_reserve(Category::Activations, free + 8 * MIB).is_err());
    /// // ...unless 8 MiB of it are idle buffers this process holds already.
    /// let r = ledger.try_reserve_reusing(Category::Activations, free + 8 * MIB, 8 * MIB)?;
    /// assert_eq!(r.bytes(), free + 8 * MIB);
    /// # Ok::<(), mem_budget::Error>(())
    /// ```
    pub fn try_reserve_reusing(
        &self,
        category: Category,
        bytes: u64,
        resident: u64,
    ) -> Result<Reservation> {
        self.try_reserve_headroom(category, bytes, 0, resident)
    }

    /// Reserves `bytes` for `category`, admitted only if `bytes + headroom`
    /// would be admitted by [`MemoryLedger::try_reserve_reusing`] with the
    /// same `resident`; only `bytes` are booked.
    ///
    /// For something that grows (a generated sequence's KV cache): it
    /// starts only where there is room for all it may need, but holds,
    /// and counts in the ledger's use and high-water marks, only what it
    /// holds now, growing with [`Reservation::grow_reusing`].
    ///
    /// ```
    /// use mem_budget::{Budget, Category, MemoryLedger, GIB, MIB};
    /// # #[derive(Debug)] struct Fixed;
    /// # impl hw_detect::MemoryProbe for Fixed {
    /// #     fn memory(&self) -> hw_detect::Result<hw_detect::MemoryInfo> {
    /// #         Ok(hw_detect::MemoryInfo::new(8 * GIB, 6 * GIB, 0, 0, None))
    /// #     }
    /// # }
    /// let ledger = MemoryLedger::new(Budget::for_class(hw_detect::HardwareClass::Generic, 8 * GIB), Fixed);
    /// let free = ledger.available_for(Category::Activations)?;
    /// // Room for 1 MiB now and the rest later: only the 1 MiB is held.
    /// let mut r = ledger.try_reserve_headroom(Category::Activations, MIB, free - MIB, 0)?;
    /// assert_eq!(ledger.used(Category::Activations), MIB);
    /// // A start whose whole need does not fit is refused.
    /// assert!(ledger.try_reserve_headroom(Category::Activations, MIB, free, 0).is_err());
    /// r.grow_reusing(MIB, 0)?;
    /// assert_eq!(r.bytes(), 2 * MIB);
    /// # Ok::<(), mem_budget::Error>(())
    /// ```
    pub fn try_reserve_headroom(
        &self,
        category: Category,
        bytes: u64,
        headroom: u64,
        resident: u64,
    ) -> Result<Reservation> {
        let mut st = self.inner.state.lock();
        match self
            .inner
            .admit_with_headroom(&mut st, category, bytes, headroom, true, resident)
        {
            Ok(()) => Ok(self.reservation(category, bytes)),
            Err(e) => {
                if e.is_refusal() {
                    st.refusals += 1;
                }
                drop(st);
                tracing::debug!(%category, bytes, headroom, resident, error = %e, "reservation refused");
                Err(e)
            }
        }
    }

    /// Reserves `bytes` for `category` as [`MemoryLedger::try_reserve`] does,
    /// except that while the category holds nothing its cap does not apply:
    /// a category's cap shares memory among competitors and is no reason to
    /// refuse the only one. The overall cap and the machine's available
    /// memory less the safety margin still apply.
    ///
    /// ```
    /// use mem_budget::{Budget, Category, MemoryLedger, GIB, MIB};
    /// # #[derive(Debug)] struct Fixed;
    /// # impl hw_detect::MemoryProbe for Fixed {
    /// #     fn memory(&self) -> hw_detect::Result<hw_detect::MemoryInfo> {
    /// #         Ok(hw_detect::MemoryInfo::new(8 * GIB, 6 * GIB, 0, 0, None))
    /// #     }
    /// # }
    /// let budget = Budget { max_model: 100 * MIB, ..Budget::for_class(hw_detect::HardwareClass::Generic, 8 * GIB) };
    /// let ledger = MemoryLedger::new(budget, Fixed);
    /// assert!(ledger.try_reserve(Category::Model, 200 * MIB).is_err());
    /// let first = ledger.try_reserve_alone(Category::Model, 200 * MIB)?;
    /// // A second model competes: the cap applies again.
    /// assert!(ledger.try_reserve_alone(Category::Model, 10 * MIB).is_err());
    /// drop(first);
    /// # Ok::<(), mem_budget::Error>(())
    /// ```
    pub fn try_reserve_alone(&self, category: Category, bytes: u64) -> Result<Reservation> {
        let mut st = self.inner.state.lock();
        let alone = st.used[category.index()] == 0;
        let result = if alone {
            self.inner.admit_uncapped(&mut st, category, bytes)
        } else {
            self.inner.admit(&mut st, category, bytes)
        };
        match result {
            Ok(()) => Ok(self.reservation(category, bytes)),
            Err(e) => {
                if e.is_refusal() {
                    st.refusals += 1;
                }
                drop(st);
                tracing::debug!(%category, bytes, alone, error = %e, "reservation refused");
                Err(e)
            }
        }
    }

    /// The former name of [`MemoryLedger::reserve_timeout`].
    #[deprecated(
        note = "named like the other waits (acquire_timeout, wait_timeout): use reserve_timeout"
    )]
    pub fn reserve_blocking(
        &self,
        category: Category,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Reservation> {
        self.reserve_timeout(category, bytes, timeout)
    }

    /// Reserves `bytes` for `category`, waiting up to `timeout` for other
    /// reservations to be released (or the machine to free memory).
    ///
    /// A request larger than its category's cap or the overall cap can never
    /// be admitted and is refused at once.
    pub fn reserve_timeout(
        &self,
        category: Category,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Reservation> {
        let start = Instant::now();
        let deadline = start + timeout;
        let recheck = Duration::from_millis(self.inner.config.blocking_recheck_ms.max(1));
        let mut st = self.inner.state.lock();
        loop {
            let err = match self.inner.admit(&mut st, category, bytes) {
                Ok(()) => return Ok(self.reservation(category, bytes)),
                Err(e) => e,
            };
            let never = bytes > self.inner.caps[category.index()] || bytes > self.inner.overall_cap;
            let now = Instant::now();
            if !err.is_refusal() || never || now >= deadline {
                if err.is_refusal() {
                    st.refusals += 1;
                }
                if never || !err.is_refusal() {
                    return Err(err);
                }
                return Err(Error::TimedOut {
                    category,
                    requested: bytes,
                    waited_ms: now.duration_since(start).as_millis() as u64,
                    last: Box::new(err),
                });
            }
            let until = deadline.min(now + recheck);
            self.inner.released.wait_until(&mut st, until);
        }
    }

    /// What `category` could reserve now: the least of what is free under
    /// its cap, under the overall cap and in the machine above the safety
    /// margin.
    pub fn available_for(&self, category: Category) -> Result<u64> {
        let mut st = self.inner.state.lock();
        self.inner.refresh(&mut st)?;
        let (cat, overall, machine) =
            self.inner
                .free(&st, category, self.inner.budget.safety_margin);
        Ok(cat.min(overall).min(machine))
    }

    /// What all categories together could reserve now: the lesser of what
    /// is free under the overall cap and in the machine above the margin.
    pub fn available_overall(&self) -> Result<u64> {
        let mut st = self.inner.state.lock();
        self.inner.refresh(&mut st)?;
        let (_, overall, machine) =
            self.inner
                .free(&st, Category::Model, self.inner.budget.safety_margin);
        Ok(overall.min(machine))
    }

    /// A snapshot of use, caps, high-water marks and refusals.
    pub fn stats(&self) -> LedgerStats {
        let st = self.inner.state.lock();
        LedgerStats {
            categories: Category::ALL
                .iter()
                .map(|&c| CategoryStats {
                    category: c,
                    used: st.used[c.index()],
                    cap: self.inner.caps[c.index()],
                    high_water: st.high[c.index()],
                })
                .collect(),
            used: st.total,
            cap: self.inner.overall_cap,
            high_water: st.total_high,
            refusals: st.refusals,
            live: st.live,
        }
    }

    /// Bytes reserved now in `category`.
    pub fn used(&self, category: Category) -> u64 {
        self.inner.state.lock().used[category.index()]
    }

    fn reservation(&self, category: Category, bytes: u64) -> Reservation {
        Reservation {
            ledger: Arc::clone(&self.inner),
            category,
            bytes,
        }
    }
}

impl Inner {
    /// Takes a fresh machine reading if the cached one is too old.
    fn refresh(&self, st: &mut MutexGuard<'_, State>) -> Result<()> {
        if !self.config.check_machine {
            return Ok(());
        }
        let max_age = Duration::from_millis(self.config.probe_max_age_ms);
        let fresh = match st.reading {
            Some(r) => max_age > Duration::ZERO && r.at.elapsed() < max_age,
            None => false,
        };
        if fresh {
            return Ok(());
        }
        let before = st.total;
        let info = MutexGuard::unlocked(st, || self.probe.memory())?;
        st.reading = Some(Reading {
            at: Instant::now(),
            available: info.effective_available,
            used_at_reading: before.min(st.total),
        });
        Ok(())
    }

    /// Free bytes under the category cap, the overall cap, and in the
    /// machine above `margin`.
    fn free(&self, st: &State, category: Category, margin: u64) -> (u64, u64, u64) {
        let i = category.index();
        let cat = self.caps[i].saturating_sub(st.used[i]);
        let overall = self.overall_cap.saturating_sub(st.total);
        let machine = match (self.config.check_machine, st.reading) {
            (true, Some(r)) => r
                .available
                .saturating_sub(margin)
                .saturating_sub(st.total.saturating_sub(r.used_at_reading)),
            _ => u64::MAX,
        };
        (cat, overall, machine)
    }

    /// Admits and books `bytes` for `category`, or says why not.
    fn admit(&self, st: &mut MutexGuard<'_, State>, category: Category, bytes: u64) -> Result<()> {
        self.admit_within(st, category, bytes, true, 0)
    }

    /// [`Inner::admit`] without the category's cap.
    fn admit_uncapped(
        &self,
        st: &mut MutexGuard<'_, State>,
        category: Category,
        bytes: u64,
    ) -> Result<()> {
        self.admit_within(st, category, bytes, false, 0)
    }

    /// Admits and books `bytes` for `category` within the overall and
    /// machine room, and within the category's cap when `capped`; `resident`
    /// of the bytes are already held by the process and not asked of the
    /// machine again.
    fn admit_within(
        &self,
        st: &mut MutexGuard<'_, State>,
        category: Category,
        bytes: u64,
        capped: bool,
        resident: u64,
    ) -> Result<()> {
        self.admit_with_headroom(st, category, bytes, 0, capped, resident)
    }

    /// [`Inner::admit_within`], admitting only if `bytes + headroom` would
    /// be admitted, and booking `bytes`.
    fn admit_with_headroom(
        &self,
        st: &mut MutexGuard<'_, State>,
        category: Category,
        bytes: u64,
        headroom: u64,
        capped: bool,
        resident: u64,
    ) -> Result<()> {
        let margin = self.budget.safety_margin;
        self.admit_above(st, category, bytes, headroom, capped, resident, margin)
    }

    /// [`Inner::admit_with_headroom`] with the machine's room counted above
    /// `margin` instead of the budget's safety margin.
    #[allow(clippy::too_many_arguments)]
    fn admit_above(
        &self,
        st: &mut MutexGuard<'_, State>,
        category: Category,
        bytes: u64,
        headroom: u64,
        capped: bool,
        resident: u64,
        margin: u64,
    ) -> Result<()> {
        let need = bytes.saturating_add(headroom);
        if need > 0 {
            self.refresh(st)?;
            let (cat, overall, machine) = self.free(st, category, margin);
            let limit = if capped && need > cat {
                Some(Limit::Category)
            } else if need > overall {
                Some(Limit::Overall)
            } else if need.saturating_sub(resident) > machine {
                Some(Limit::Machine)
            } else {
                None
            };
            if let Some(limit) = limit {
                return Err(self.refusal(category, need, (cat, overall, machine), limit, margin));
            }
        }
        self.book(st, category, bytes);
        st.live += 1;
        Ok(())
    }

    fn book(&self, st: &mut State, category: Category, bytes: u64) {
        let i = category.index();
        st.used[i] += bytes;
        st.total += bytes;
        st.high[i] = st.high[i].max(st.used[i]);
        st.total_high = st.total_high.max(st.total);
    }

    fn release(&self, category: Category, bytes: u64, ends: bool) {
        {
            let mut st = self.state.lock();
            let i = category.index();
            st.used[i] -= bytes;
            st.total -= bytes;
            if ends {
                st.live -= 1;
            }
        }
        if bytes > 0 {
            self.released.notify_all();
        }
    }

    fn refusal(
        &self,
        category: Category,
        bytes: u64,
        free: (u64, u64, u64),
        limit: Limit,
        margin: u64,
    ) -> Error {
        let (cat, overall, machine) = free;
        let cap = self.caps[category.index()];
        let suggestion = match limit {
            Limit::Category if bytes > cap => format!(
                "the request is larger than the whole {category} cap; raise the budget's cap or {}",
                category.advice()
            ),
            Limit::Overall if bytes > self.overall_cap => format!(
                "the request is larger than the whole overall cap of {}; {}",
                Bytes(self.overall_cap),
                category.advice()
            ),
            Limit::Category | Limit::Overall => format!(
                "wait for {category} reservations to be released (reserve_timeout) or {}",
                category.advice()
            ),
            Limit::Machine => format!("close other programs, or {}", category.advice()),
        };
        Error::Refused {
            category,
            requested: bytes,
            free_in_category: cat,
            category_cap: cap,
            free_overall: overall,
            free_in_machine: if machine == u64::MAX {
                overall
            } else {
                machine
            },
            safety_margin: margin,
            suggestion,
        }
    }
}

/// Bytes held in the ledger for one category; released when dropped.
///
/// `Send + Sync`: a model's reservation can live in whatever thread owns
/// the model.
#[derive(Debug)]
#[must_use = "a reservation is released as soon as it is dropped"]
pub struct Reservation {
    ledger: Arc<Inner>,
    category: Category,
    bytes: u64,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The category the bytes are held in.
    pub fn category(&self) -> Category {
        self.category
    }

    /// Holds `extra` more bytes, admitted like a new reservation; on refusal
    /// the reservation keeps what it had.
    pub fn grow(&mut self, extra: u64) -> Result<()> {
        self.grow_reusing(extra, 0)
    }

    /// Holds `extra` more bytes, admitted as
    /// [`MemoryLedger::try_reserve_reusing`] admits a new reservation: up to
    /// `resident` of them are memory the process holds already (a pool's
    /// idle buffers) and are not asked of the machine again. On refusal the
    /// reservation keeps what it had.
    pub fn grow_reusing(&mut self, extra: u64, resident: u64) -> Result<()> {
        let inner = &self.ledger;
        let mut st = inner.state.lock();
        match inner.admit_within(&mut st, self.category, extra, true, resident) {
            Ok(()) => {
                st.live -= 1; // admit counted a new reservation; this is the same one
                self.bytes += extra;
                Ok(())
            }
            Err(e) => {
                if e.is_refusal() {
                    st.refusals += 1;
                }
                Err(e)
            }
        }
    }

    /// Holds `extra` more bytes as [`Reservation::grow_reusing`] does, but
    /// counts the machine's room down to nothing instead of down to the
    /// budget's safety margin: the caps and the machine's reading still
    /// apply, the margin does not.
    ///
    /// For work that was admitted whole and has nobody to take room from
    /// (one generated sequence running alone, admitted where its whole
    /// length fit above the margin, which then finds the margin eaten by
    /// memory the ledger cannot see): stopping it would lose its work while
    /// the machine still has the bytes. New work is still admitted only
    /// above the margin, so it waits while this one runs.
    ///
    /// ```
    /// use mem_budget::{Budget, Category, MemoryLedger, GIB, MIB};
    /// # #[derive(Debug)] struct Tight;
    /// # impl hw_detect::MemoryProbe for Tight {
    /// #     fn memory(&self) -> hw_detect::Result<hw_detect::MemoryInfo> {
    /// #         Ok(hw_detect::MemoryInfo::new(8 * GIB, 420 * MIB, 0, 0, None))
    /// #     }
    /// # }
    /// let ledger = MemoryLedger::new(Budget::for_class(hw_detect::HardwareClass::Generic, 8 * GIB), Tight);
    /// let free = ledger.available_for(Category::Activations)?;
    /// let mut r = ledger.try_reserve(Category::Activations, free)?;
    /// // Above the margin nothing is left...
    /// assert!(r.grow(MIB).is_err());
    /// // ...but the machine still has the margin's bytes.
    /// r.grow_into_margin(MIB, 0)?;
    /// assert_eq!(r.bytes(), free + MIB);
    /// # Ok::<(), mem_budget::Error>(())
    /// ```
    pub fn grow_into_margin(&mut self, extra: u64, resident: u64) -> Result<()> {
        let inner = &self.ledger;
        let mut st = inner.state.lock();
        match inner.admit_above(&mut st, self.category, extra, 0, true, resident, 0) {
            Ok(()) => {
                st.live -= 1; // admit counted a new reservation; this is the same one
                self.bytes += extra;
                Ok(())
            }
            Err(e) => {
                if e.is_refusal() {
                    st.refusals += 1;
                }
                Err(e)
            }
        }
    }

    /// Gives back up to `less` bytes (all it holds at most); returns how
    /// many were given back.
    pub fn shrink(&mut self, less: u64) -> u64 {
        let given = less.min(self.bytes);
        self.bytes -= given;
        self.ledger.release(self.category, given, false);
        given
    }

    /// Grows or shrinks to exactly `bytes`.
    pub fn resize(&mut self, bytes: u64) -> Result<()> {
        if bytes >= self.bytes {
            self.grow(bytes - self.bytes)
        } else {
            self.shrink(self.bytes - bytes);
            Ok(())
        }
    }

    /// Splits `bytes` off into a reservation of their own (same category);
    /// the ledger's totals do not change.
    pub fn split(&mut self, bytes: u64) -> Result<Reservation> {
        if bytes > self.bytes {
            return Err(Error::SplitTooLarge {
                requested: bytes,
                held: self.bytes,
            });
        }
        self.ledger.state.lock().live += 1;
        self.bytes -= bytes;
        Ok(Reservation {
            ledger: Arc::clone(&self.ledger),
            category: self.category,
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.release(self.category, self.bytes, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{GIB, MIB};
    use hw_detect::{HardwareClass, MemoryInfo};
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// A probe whose available memory the test sets.
    #[derive(Debug)]
    struct Scripted {
        available: AtomicU64,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn new(available: u64) -> Arc<Scripted> {
            Arc::new(Scripted {
                available: AtomicU64::new(available),
                calls: AtomicUsize::new(0),
            })
        }
    }

    impl MemoryProbe for Scripted {
        fn memory(&self) -> hw_detect::Result<MemoryInfo> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(MemoryInfo::new(
                16 * GIB,
                self.available.load(Ordering::Relaxed),
                0,
                0,
                None,
            ))
        }
    }

    fn air(probe: Arc<Scripted>, probe_max_age_ms: u64) -> MemoryLedger {
        MemoryLedger::with_config(
            Budget::for_class(HardwareClass::AppleM1Air, 8 * GIB),
            probe,
            LedgerConfig {
                probe_max_age_ms,
                ..LedgerConfig::default()
            },
        )
    }

    #[test]
    fn reservation_is_send_and_sync_and_ledger_clones_share() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Reservation>();
        assert_send_sync::<MemoryLedger>();
        let ledger = air(Scripted::new(6 * GIB), 0);
        let other = ledger.clone();
        let r = other.try_reserve(Category::Cache, 10 * MIB).unwrap();
        assert_eq!(ledger.used(Category::Cache), 10 * MIB);
        drop(r);
        assert_eq!(ledger.used(Category::Cache), 0);
    }

    #[test]
    fn caps_per_category_and_overall() {
        let ledger = air(Scripted::new(16 * GIB), 0);
        // Air: model 2, cache 1, overall 8 - 2 - 1.5 = 4.5 GiB.
        let m = ledger.try_reserve(Category::Model, 2 * GIB).unwrap();
        let err = ledger.try_reserve(Category::Model, 1).unwrap_err();
        match &err {
            Error::Refused {
                category,
                requested,
                free_in_category,
                category_cap,
                ..
            } => {
                assert_eq!(*category, Category::Model);
                assert_eq!(*requested, 1);
                assert_eq!(*free_in_category, 0);
                assert_eq!(*category_cap, 2 * GIB);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let c = ledger.try_reserve(Category::Cache, GIB).unwrap();
        // Buffers have no own cap: only the 1.5 GiB left overall.
        let err = ledger.try_reserve(Category::Buffers, 2 * GIB).unwrap_err();
        assert!(
            err.to_string().contains("1.50 GiB under the overall cap"),
            "{err}"
        );
        let b = ledger.try_reserve(Category::Buffers, 3 * GIB / 2).unwrap();
        let s = ledger.stats();
        assert_eq!(s.used, ledger.budget().overall_cap());
        assert_eq!(s.refusals, 2);
        assert_eq!(s.live, 3);
        drop((m, c, b));
        let s = ledger.stats();
        assert_eq!((s.used, s.live), (0, 0));
        assert_eq!(s.high_water, s.cap);
        assert_eq!(s.category(Category::Model).high_water, 2 * GIB);
    }

    #[test]
    fn machine_free_memory_less_margin_limits_admission() {
        let probe = Scripted::new(2 * GIB);
        let ledger = air(Arc::clone(&probe), 0);
        // 2 GiB available, 1.5 GiB margin: 512 MiB may be reserved.
        let err = ledger.try_reserve(Category::Model, 600 * MIB).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("512.0 MiB available above the 1.50 GiB safety margin"),
            "{text}"
        );
        assert!(text.contains("close other programs"), "{text}");
        let r = ledger.try_reserve(Category::Model, 512 * MIB).unwrap();
        probe.available.store(4 * GIB, Ordering::Relaxed);
        let r2 = ledger.try_reserve(Category::Model, 600 * MIB).unwrap();
        drop((r, r2));
    }

    #[test]
    fn cached_reading_counts_reservations_made_since() {
        let probe = Scripted::new(2 * GIB);
        let ledger = air(Arc::clone(&probe), 60_000);
        let a = ledger.try_reserve(Category::Cache, 300 * MIB).unwrap();
        // The reading is reused, but the 300 MiB already promised count.
        let err = ledger.try_reserve(Category::Cache, 300 * MIB).unwrap_err();
        assert!(err.is_refusal());
        assert_eq!(probe.calls.load(Ordering::Relaxed), 1, "one probe for both");
        assert_eq!(ledger.available_for(Category::Cache).unwrap(), 212 * MIB);
        drop(a);
    }

    #[test]
    fn grow_shrink_resize_split() {
        let ledger = air(Scripted::new(16 * GIB), 0);
        let mut r = ledger.try_reserve(Category::Model, GIB).unwrap();
        r.grow(GIB / 2).unwrap();
        assert_eq!(ledger.used(Category::Model), 3 * GIB / 2);
        assert!(r.grow(GIB).is_err(), "past the 2 GiB model cap");
        assert_eq!(r.bytes(), 3 * GIB / 2, "a refused grow keeps what it had");
        assert_eq!(r.shrink(GIB), GIB);
        assert_eq!(ledger.used(Category::Model), GIB / 2);
        r.resize(2 * GIB).unwrap();
        let half = r.split(GIB).unwrap();
        assert!(r.split(2 * GIB).is_err());
        assert_eq!(ledger.stats().live, 2);
        assert_eq!((r.bytes(), half.bytes()), (GIB, GIB));
        drop(r);
        assert_eq!(ledger.used(Category::Model), GIB);
        drop(half);
        assert_eq!(ledger.stats().used, 0);
        assert_eq!(ledger.stats().live, 0);
    }

    #[test]
    fn reserve_timeout_waits_for_a_release_then_times_out() {
        let ledger = air(Scripted::new(16 * GIB), 0);
        let held = ledger.try_reserve(Category::Cache, GIB).unwrap();
        let l2 = ledger.clone();
        let waiter = std::thread::spawn(move || {
            l2.reserve_timeout(Category::Cache, GIB / 2, Duration::from_secs(10))
        });
        std::thread::sleep(Duration::from_millis(30));
        drop(held);
        let got = waiter.join().unwrap().unwrap();
        assert_eq!(got.bytes(), GIB / 2);
        // Nothing is released now: a short wait ends in a timeout error.
        let err = ledger
            .reserve_timeout(Category::Cache, GIB, Duration::from_millis(30))
            .unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err}");
        // More than the whole cap: refused at once, not after the timeout.
        let start = Instant::now();
        let err = ledger
            .reserve_timeout(Category::Cache, 2 * GIB, Duration::from_secs(10))
            .unwrap_err();
        assert!(matches!(err, Error::Refused { .. }));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn machine_limited_blocking_wait_notices_freed_memory() {
        let probe = Scripted::new(GIB);
        let ledger = air(Arc::clone(&probe), 0);
        let p2 = Arc::clone(&probe);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            p2.available.store(8 * GIB, Ordering::Relaxed);
        });
        let r = ledger
            .reserve_timeout(Category::Activations, GIB, Duration::from_secs(10))
            .unwrap();
        assert_eq!(r.bytes(), GIB);
        t.join().unwrap();
    }

    #[test]
    fn probe_errors_are_reported() {
        #[derive(Debug)]
        struct Broken;
        impl MemoryProbe for Broken {
            fn memory(&self) -> hw_detect::Result<MemoryInfo> {
                Err(hw_detect::Error::System {
                    what: "memory",
                    reason: "test".into(),
                })
            }
        }
        let ledger = MemoryLedger::new(Budget::default(), Broken);
        let err = ledger.try_reserve(Category::Model, 1).unwrap_err();
        assert!(matches!(err, Error::Probe(_)));
        assert!(!err.is_refusal());
        // Zero bytes need no reading.
        assert!(ledger.try_reserve(Category::Model, 0).is_ok());
    }
}
