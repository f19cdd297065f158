//! [`LedgerGate`]: the router's [`MemoryGate`] answered by mem-budget's ledger
//! and pressure monitor. The runtime is where the two meet: tier-router knows
//! no memory accountant, and mem-budget knows no router.

use std::sync::Arc;

use mem_budget::{Category, MemoryLedger, PressureMonitor};
use tier_router::MemoryGate;

/// The router's name for mem-budget's pressure `level` (the same four levels,
/// in the same order, printed and serialized alike).
pub fn router_pressure(level: mem_budget::PressureLevel) -> tier_router::PressureLevel {
    match level {
        mem_budget::PressureLevel::Normal => tier_router::PressureLevel::Normal,
        mem_budget::PressureLevel::Elevated => tier_router::PressureLevel::Elevated,
        mem_budget::PressureLevel::High => tier_router::PressureLevel::High,
        mem_budget::PressureLevel::Critical => tier_router::PressureLevel::Critical,
    }
}

/// The memory gate of a program that uses mem-budget: the pressure level is
/// the monitor's last reading, and the free bytes are what the ledger could
/// reserve now in `category` (`Category::Model` by default: a tier's memory is
/// its model's).
///
/// ```
/// use std::sync::Arc;
/// use runtime::budget::{Budget, MemoryLedger, PressureConfig, PressureMonitor, GIB};
/// use runtime::hw::{HardwareClass, MemoryInfo, MemoryProbe};
/// use runtime::router::{MemoryGate, PressureLevel};
///
/// #[derive(Debug)]
/// struct Machine;
/// impl MemoryProbe for Machine {
///     fn memory(&self) -> runtime::hw::Result<MemoryInfo> {
///         Ok(MemoryInfo {
///             total: 16 * GIB,
///             available: 12 * GIB,
///             swap_total: 0,
///             swap_free: 0,
///             cgroup: None,
///             effective_total: 16 * GIB,
///             effective_available: 12 * GIB,
///         })
///     }
/// }
///
/// let machine = Arc::new(Machine);
/// let budget = Budget::for_class(HardwareClass::IntelHybridLaptop, 16 * GIB);
/// let ledger = Arc::new(MemoryLedger::with_config(budget, machine.clone(), Default::default()));
/// let monitor = Arc::new(PressureMonitor::new(machine, PressureConfig::default()));
/// monitor.check_now()?;
/// let gate = runtime::LedgerGate::new(ledger, monitor);
/// assert_eq!(gate.pressure(), PressureLevel::Normal);
/// assert!(gate.fits(GIB / 2));
/// # Ok::<(), runtime::budget::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LedgerGate {
    ledger: Arc<MemoryLedger>,
    monitor: Arc<PressureMonitor>,
    category: Category,
}

impl LedgerGate {
    /// A gate over `ledger` and `monitor`, asking for room in `Category::Model`.
    pub fn new(ledger: Arc<MemoryLedger>, monitor: Arc<PressureMonitor>) -> Self {
        Self {
            ledger,
            monitor,
            category: Category::Model,
        }
    }

    /// Asks for room in `category` instead.
    pub fn category(mut self, category: Category) -> Self {
        self.category = category;
        self
    }
}

impl MemoryGate for LedgerGate {
    fn pressure(&self) -> tier_router::PressureLevel {
        router_pressure(self.monitor.level())
    }

    /// What the ledger could reserve now; 0 when the ledger cannot read the
    /// machine's memory (so that no new model is loaded blind).
    fn available_bytes(&self) -> u64 {
        match self.ledger.available_for(self.category) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "memory ledger unavailable; treating free memory as 0");
                0
            }
        }
    }
}
