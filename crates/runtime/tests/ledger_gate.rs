//! Routing through mem-budget's real ledger and pressure monitor (the runtime's `LedgerGate`),
//! fed by a fixture memory probe.

use std::sync::Arc;

use hw_detect::{HardwareClass, MemoryInfo, MemoryProbe};
use mem_budget::{Budget, Category, MemoryLedger, PressureConfig, PressureMonitor, GIB, MIB};
use parking_lot::Mutex;
use runtime::{router_pressure, LedgerGate};
use tier_router::{
    BackendError, Deadline, MemoryGate, PressureLevel, Router, RouterConfig, SkipReason,
    TaskFeatures, Tier, TierSpec,
};

/// A machine whose available memory the test sets.
#[derive(Debug)]
struct Machine {
    total: u64,
    available: Mutex<u64>,
}

impl MemoryProbe for Machine {
    fn memory(&self) -> hw_detect::Result<MemoryInfo> {
        let available = *self.available.lock();
        Ok(MemoryInfo {
            total: self.total,
            available,
            swap_total: 0,
            swap_free: 0,
            cgroup: None,
            effective_total: self.total,
            effective_available: available,
        })
    }
}

fn answer(name: &'static str) -> Arc<dyn tier_router::Backend<str, String>> {
    Arc::new(move |_: &str, _: Deadline| -> Result<String, BackendError> { Ok(name.to_string()) })
}

#[test]
fn routing_follows_the_ledger_and_the_monitor() {
    let total = 16 * GIB;
    let machine = Arc::new(Machine {
        total,
        available: Mutex::new(12 * GIB),
    });
    let budget = Budget::for_class(HardwareClass::IntelHybridLaptop, total);
    let ledger = Arc::new(MemoryLedger::with_config(
        budget,
        machine.clone(),
        Default::default(),
    ));
    let monitor = Arc::new(PressureMonitor::new(
        machine.clone(),
        PressureConfig::default(),
    ));
    monitor.check_now().unwrap();
    let gate = Arc::new(LedgerGate::new(ledger.clone(), monitor.clone()));
    assert_eq!(gate.pressure(), PressureLevel::Normal);
    let model_room = gate.available_bytes();
    assert!(model_room > 500 * MIB, "model room {model_room}");

    let router = Router::new(RouterConfig::default(), gate.clone())
        .unwrap()
        .with_tier(TierSpec::new("small", Tier::Small, answer("small")).memory_bytes(100 * MIB))
        .unwrap()
        .with_tier(TierSpec::new("medium", Tier::Medium, answer("medium")).memory_bytes(500 * MIB))
        .unwrap()
        .with_tier(TierSpec::new("rules", Tier::RuleBased, answer("rules")))
        .unwrap();
    let task = TaskFeatures::with_tokens(1000); // asks for medium
    let served = router.serve(&task, "q", Deadline::none()).unwrap();
    assert_eq!(served.backend, "medium");

    // Another model takes all but 200 MiB of the model budget: medium no longer fits.
    let held = ledger
        .try_reserve(Category::Model, model_room - 200 * MIB)
        .unwrap();
    let d = router.route(&task);
    assert_eq!(d.chain[0].name, "small");
    assert!(matches!(
        d.skipped[0].reason,
        SkipReason::MemoryDoesNotFit { needed, available } if needed == 500 * MIB && available <= 200 * MIB
    ));
    drop(held);
    assert_eq!(router.route(&task).chain[0].name, "medium");

    // The machine runs out of memory: the monitor reads critical, only the rule-based tier serves.
    *machine.available.lock() = GIB / 2;
    monitor.check_now().unwrap();
    assert_eq!(gate.pressure(), PressureLevel::Critical);
    let served = router.serve(&task, "q", Deadline::none()).unwrap();
    assert_eq!(served.tier, Tier::RuleBased);
    assert!(served.trail[0].to_string().contains("critical"));
}

#[test]
fn every_budget_level_maps_to_the_router_level_of_the_same_name() {
    use mem_budget::PressureLevel as BudgetLevel;
    let pairs = [
        (BudgetLevel::Normal, PressureLevel::Normal),
        (BudgetLevel::Elevated, PressureLevel::Elevated),
        (BudgetLevel::High, PressureLevel::High),
        (BudgetLevel::Critical, PressureLevel::Critical),
    ];
    for (budget, router) in pairs {
        assert_eq!(router_pressure(budget), router);
        assert_eq!(budget.to_string(), router.to_string());
        assert_eq!(
            serde_json::to_value(budget).unwrap(),
            serde_json::to_value(router).unwrap()
        );
    }
}
