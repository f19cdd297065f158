//! The routing table for each pressure level, memory fit, and explanations.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tier_router::{
    Backend, BackendError, Deadline, FixedGate, MemoryGate, Placement, PressureLevel, Role, Router,
    RouterConfig, SkipReason, TaskFeatures, Tier, TierSpec,
};

/// A local backend that answers with its own name, optionally already loaded.
struct Named {
    name: &'static str,
    loaded: AtomicBool,
}

impl Backend<str, String> for Named {
    fn call(&self, _req: &str, _d: Deadline) -> Result<String, BackendError> {
        Ok(self.name.to_string())
    }
    fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }
}

fn named(name: &'static str, loaded: bool) -> Arc<Named> {
    Arc::new(Named {
        name,
        loaded: AtomicBool::new(loaded),
    })
}

const MIB: u64 = 1 << 20;

/// small (CPU, 100 MiB, loaded), medium (CPU, 300 MiB), large (CPU, 1 GiB),
/// large-gpu (accelerator, 1 GiB), remote, rules.
fn router(pressure: PressureLevel, available: u64) -> Router<str, String> {
    let gate: Arc<dyn MemoryGate> = Arc::new(FixedGate {
        pressure,
        available_bytes: available,
    });
    Router::new(RouterConfig::default(), gate)
        .unwrap()
        .with_tier(
            TierSpec::new("small", Tier::Small, named("small", true)).memory_bytes(100 * MIB),
        )
        .unwrap()
        .with_tier(
            TierSpec::new("medium", Tier::Medium, named("medium", false)).memory_bytes(300 * MIB),
        )
        .unwrap()
        .with_tier(
            TierSpec::new("large", Tier::Large, named("large", false)).memory_bytes(1024 * MIB),
        )
        .unwrap()
        .with_tier(
            TierSpec::new("large-gpu", Tier::Large, named("large-gpu", false))
                .memory_bytes(1024 * MIB)
                .placement(Placement::Accelerator),
        )
        .unwrap()
        .with_tier(TierSpec::new("remote", Tier::Remote, named("remote", true)))
        .unwrap()
        .with_tier(TierSpec::new(
            "rules",
            Tier::RuleBased,
            named("rules", true),
        ))
        .unwrap()
}

fn chain(r: &Router<str, String>, task: &TaskFeatures) -> Vec<String> {
    r.route(task).chain.iter().map(|c| c.name.clone()).collect()
}

fn medium_task() -> TaskFeatures {
    TaskFeatures {
        tokens: 400,
        grade_level: Some(12),
        subject: Some("Physics".into()),
        ..TaskFeatures::default()
    }
}

#[test]
fn routing_table_by_pressure_level() {
    let plenty = 8192 * MIB;
    let task = medium_task();
    // Normal: chosen (medium), smaller, larger (in registration order), remote, rules.
    let r = router(PressureLevel::Normal, plenty);
    let d = r.route(&task);
    assert_eq!(d.complexity.tier, Tier::Medium);
    assert_eq!(
        chain(&r, &task),
        ["medium", "small", "large", "large-gpu", "remote", "rules"]
    );
    assert_eq!(d.chain[0].role, Role::Chosen);
    assert_eq!(d.chain[1].role, Role::Smaller);
    assert_eq!(d.chain[2].role, Role::Larger);
    assert!(d.skipped.is_empty());

    // Elevated: accelerator offload, remote, then CPU locals, rules.
    let r = router(PressureLevel::Elevated, plenty);
    assert_eq!(
        chain(&r, &task),
        ["large-gpu", "remote", "medium", "small", "large", "rules"]
    );
    assert_eq!(r.route(&task).chain[0].role, Role::Offload);

    // High: as elevated, but CPU models that are not loaded are skipped.
    let r = router(PressureLevel::High, plenty);
    let d = r.route(&task);
    assert_eq!(chain(&r, &task), ["large-gpu", "remote", "small", "rules"]);
    let skipped: Vec<_> = d
        .skipped
        .iter()
        .map(|s| (s.name.as_str(), s.reason.clone()))
        .collect();
    assert_eq!(
        skipped,
        [
            (
                "medium",
                SkipReason::NotLoadedUnderPressure(PressureLevel::High)
            ),
            (
                "large",
                SkipReason::NotLoadedUnderPressure(PressureLevel::High)
            ),
        ]
    );

    // Critical: the rule-based tier only; every other tier says why not.
    let r = router(PressureLevel::Critical, plenty);
    let d = r.route(&task);
    assert_eq!(chain(&r, &task), ["rules"]);
    assert_eq!(d.skipped.len(), 5);
    assert!(d
        .skipped
        .iter()
        .all(|s| s.reason == SkipReason::CriticalPressure));
    let served = r.serve(&task, "q", Deadline::none()).unwrap();
    assert_eq!(
        (served.tier, served.response.as_str()),
        (Tier::RuleBased, "rules")
    );
    assert_eq!(served.trail.len(), 6);
}

#[test]
fn tiers_that_do_not_fit_are_skipped_for_the_next_that_fits() {
    // 200 MiB free: medium (300) and large (1024) do not fit; small is loaded already.
    let r = router(PressureLevel::Normal, 200 * MIB);
    let task = medium_task();
    let d = r.route(&task);
    assert_eq!(chain(&r, &task), ["small", "remote", "rules"]);
    assert_eq!(
        d.skipped[0],
        tier_router::Skipped {
            name: "medium".into(),
            tier: Tier::Medium,
            reason: SkipReason::MemoryDoesNotFit {
                needed: 300 * MIB,
                available: 200 * MIB
            },
        }
    );
    let served = r.serve(&task, "q", Deadline::none()).unwrap();
    assert_eq!(served.backend, "small");
    assert_eq!(served.tier, Tier::Small);
    // The record says why the chosen tier did not serve.
    assert!(served.trail[0]
        .to_string()
        .contains("free under the memory budget"));
    let text = d.to_string();
    assert!(text.contains("asks for medium"), "{text}");
    assert!(text.contains("skipped medium"), "{text}");
}

#[test]
fn small_and_large_tasks_pick_their_tiers() {
    let r = router(PressureLevel::Normal, 8192 * MIB);
    let small = TaskFeatures::with_tokens(50);
    assert_eq!(chain(&r, &small)[..3], ["small", "medium", "large"]);
    let large = TaskFeatures::with_tokens(4000);
    assert_eq!(
        chain(&r, &large)[..4],
        ["large", "large-gpu", "medium", "small"]
    );
}

#[test]
fn a_router_without_tiers_or_fallback_says_what_to_do() {
    let r: Router<str, String> =
        Router::new(RouterConfig::default(), Arc::new(FixedGate::default())).unwrap();
    let e = r
        .serve(&TaskFeatures::default(), "q", Deadline::none())
        .unwrap_err();
    assert!(e.to_string().contains("register"), "{e}");

    let failing = |_: &str, _: Deadline| -> Result<String, BackendError> {
        Err(BackendError::permanent("disk gone"))
    };
    let r = Router::new(RouterConfig::default(), Arc::new(FixedGate::default()))
        .unwrap()
        .with_tier(TierSpec::new("only", Tier::Small, Arc::new(failing)))
        .unwrap();
    let e = r
        .serve(&TaskFeatures::default(), "q", Deadline::none())
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("disk gone") && msg.contains("rule-based"),
        "{msg}"
    );

    let dup = Router::new(RouterConfig::default(), Arc::new(FixedGate::default()))
        .unwrap()
        .with_tier(TierSpec::new("a", Tier::Small, Arc::new(failing)))
        .unwrap()
        .with_tier(TierSpec::new("a", Tier::Medium, Arc::new(failing)));
    assert!(dup.is_err());
}

#[test]
fn a_panicking_backend_falls_back_and_is_recorded() {
    let boom = |_: &str, _: Deadline| -> Result<String, BackendError> { panic!("kernel exploded") };
    let r = Router::new(RouterConfig::default(), Arc::new(FixedGate::default()))
        .unwrap()
        .with_tier(TierSpec::new("boom", Tier::Small, Arc::new(boom)))
        .unwrap()
        .with_tier(TierSpec::new(
            "rules",
            Tier::RuleBased,
            named("rules", true),
        ))
        .unwrap();
    let s = r
        .serve(&TaskFeatures::default(), "q", Deadline::none())
        .unwrap();
    assert_eq!(s.response, "rules");
    assert!(s.trail[0].to_string().contains("kernel exploded"));
}
