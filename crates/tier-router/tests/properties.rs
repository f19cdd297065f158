//! Property tests: the breaker against a reference model over generated outcome sequences, and
//! exactly one answer per request when backends fail mid-flight on concurrent threads.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proptest::prelude::*;
use tier_router::{
    BackendError, BreakerConfig, BreakerState, CallOutcome, CircuitBreaker, Deadline, FixedGate,
    Permit, RetryConfig, Router, RouterConfig, TaskFeatures, Tier, TierSpec,
};

// ---------------------------------------------------------------- reference model

#[derive(Debug, Clone, Copy, PartialEq)]
enum St {
    Closed,
    Open,
    HalfOpen,
}

/// The breaker's documented rules, written plainly.
struct Model {
    failures: u32,
    rate: f64,
    window: usize,
    min_calls: usize,
    open_for: u64,
    probes: u32,
    slow: Option<u64>,
    state: St,
    generation: u64,
    calls: Vec<bool>,
    consecutive: u32,
    open_until: u64,
    probes_admitted: u32,
    probes_ok: u32,
    admitted: u64,
    rejected: u64,
    ok: u64,
    failed: u64,
}

impl Model {
    fn set(&mut self, state: St, now: u64) {
        self.state = state;
        self.generation += 1;
        self.probes_admitted = 0;
        self.probes_ok = 0;
        if state == St::Open {
            self.open_until = now + self.open_for;
        }
        if state == St::Closed {
            self.calls.clear();
            self.consecutive = 0;
        }
    }

    /// `Some((generation, started))` when admitted.
    fn acquire(&mut self, now: u64) -> Option<(u64, u64)> {
        if self.state == St::Open && now >= self.open_until {
            self.set(St::HalfOpen, now);
        }
        let ok = match self.state {
            St::Closed => true,
            St::Open => false,
            St::HalfOpen => {
                if self.probes_admitted < self.probes {
                    self.probes_admitted += 1;
                    true
                } else {
                    false
                }
            }
        };
        if ok {
            self.admitted += 1;
            Some((self.generation, now))
        } else {
            self.rejected += 1;
            None
        }
    }

    fn complete(&mut self, generation: u64, started: u64, failure: bool, now: u64) {
        let failed = failure || self.slow.is_some_and(|s| now - started > s);
        if failed {
            self.failed += 1;
        } else {
            self.ok += 1;
        }
        if generation != self.generation {
            return;
        }
        match self.state {
            St::Closed => {
                self.calls.push(failed);
                if self.calls.len() > self.window {
                    self.calls.remove(0);
                }
                self.consecutive = if failed { self.consecutive + 1 } else { 0 };
                let f = self.calls.iter().filter(|x| **x).count();
                let n = self.calls.len();
                if (self.failures > 0 && self.consecutive >= self.failures)
                    || (n >= self.min_calls && f as f64 >= self.rate * n as f64)
                {
                    self.set(St::Open, now);
                }
            }
            St::HalfOpen => {
                if failed {
                    self.set(St::Open, now);
                } else {
                    self.probes_ok += 1;
                    if self.probes_ok >= self.probes {
                        self.set(St::Closed, now);
                    }
                }
            }
            St::Open => {}
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Advance the clock, then ask for a permit and hold it.
    Acquire { advance_ms: u64 },
    /// Complete the held permit at this position (modulo), the call having taken `took_ms`.
    Complete {
        pick: usize,
        failure: bool,
        took_ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..80).prop_map(|advance_ms| Op::Acquire { advance_ms }),
        (0usize..4, prop::bool::weighted(0.5), 0u64..30).prop_map(|(pick, failure, took_ms)| {
            Op::Complete {
                pick,
                failure,
                took_ms,
            }
        }),
    ]
}

fn config() -> impl Strategy<Value = BreakerConfig> {
    (
        0u32..5,
        prop::sample::select(vec![0.25f32, 0.5, 0.75, 1.0]),
        1usize..12,
        1u32..4,
        prop::option::of(Just(Duration::from_millis(15))),
    )
        .prop_flat_map(|(failures, rate, window, probes, slow)| {
            (1usize..=window).prop_map(move |min_calls| BreakerConfig {
                failures,
                failure_rate: rate,
                window,
                min_calls,
                open_for: Duration::from_millis(50),
                half_open_probes: probes,
                slow_call: slow,
            })
        })
}

fn state_of(s: BreakerState) -> St {
    match s {
        BreakerState::Closed => St::Closed,
        BreakerState::Open => St::Open,
        BreakerState::HalfOpen => St::HalfOpen,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn breaker_matches_reference_model(cfg in config(), ops in prop::collection::vec(op(), 1..120)) {
        let breaker = CircuitBreaker::new("p", cfg.clone()).unwrap();
        let mut model = Model {
            failures: cfg.failures,
            rate: cfg.failure_rate as f64,
            window: cfg.window,
            min_calls: cfg.min_calls,
            open_for: 50,
            probes: cfg.half_open_probes,
            slow: cfg.slow_call.map(|d| d.as_millis() as u64),
            state: St::Closed,
            generation: 0,
            calls: Vec::new(),
            consecutive: 0,
            open_until: 0,
            probes_admitted: 0,
            probes_ok: 0,
            admitted: 0,
            rejected: 0,
            ok: 0,
            failed: 0,
        };
        let t0 = Instant::now();
        let mut now = 0u64;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut held: Vec<(Permit<'_>, (u64, u64))> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire { advance_ms } => {
                    now += advance_ms;
                    let real = breaker.try_acquire_at(at(now));
                    let expected = model.acquire(now);
                    prop_assert_eq!(real.is_ok(), expected.is_some(), "admission at {} ms", now);
                    if let (Ok(p), Some(m)) = (real, expected) {
                        held.push((p, m));
                    }
                }
                Op::Complete { pick, failure, took_ms } => {
                    if held.is_empty() {
                        continue;
                    }
                    let (permit, (generation, started)) = held.remove(pick % held.len());
                    now += took_ms;
                    let outcome = if failure { CallOutcome::Failure } else { CallOutcome::Success };
                    // The permit's clock starts at admission; align its duration with the model's.
                    permit.record_at(outcome, at(now));
                    model.complete(generation, started, failure, now);
                }
            }
            let st = breaker.stats();
            prop_assert_eq!(state_of(st.state), model.state);
            prop_assert_eq!(st.admitted, model.admitted);
            prop_assert_eq!(st.rejected, model.rejected);
            prop_assert_eq!(st.successes, model.ok);
            prop_assert_eq!(st.failures, model.failed);
            prop_assert_eq!(st.consecutive_failures, model.consecutive);
            prop_assert_eq!(st.window_calls, model.calls.len());
        }
    }
}

// ---------------------------------------------------------------- exactly one answer

/// A deterministic pseudo-random number from a few integers (splitmix64).
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(b.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(c);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend that fails part of its calls mid-flight: transient or permanent errors, panics,
/// or a short stall before failing. Counts the answers it gives.
struct Flaky {
    seed: u64,
    fail_per_mille: u64,
    calls: AtomicU64,
    answered: AtomicU64,
}

impl tier_router::Backend<u64, (u64, &'static str)> for Flaky {
    fn call(&self, id: &u64, _d: Deadline) -> Result<(u64, &'static str), BackendError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let r = mix(self.seed, *id, n);
        if r % 1000 < self.fail_per_mille {
            match (r >> 20) % 4 {
                0 => return Err(BackendError::transient("busy")),
                1 => return Err(BackendError::permanent("broken")),
                2 => panic!("backend crashed mid-flight"),
                _ => {
                    std::thread::sleep(Duration::from_micros(200));
                    return Err(BackendError::transient("stalled then dropped"));
                }
            }
        }
        self.answered.fetch_add(1, Ordering::SeqCst);
        Ok((*id, "flaky"))
    }
}

/// Answers received per request id: (echoed id, serving tier).
type Answers = Arc<Mutex<HashMap<u64, Vec<(u64, Tier)>>>>;

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_request_is_answered_exactly_once(
        seed in any::<u64>(),
        local_fail in 0u64..1000,
        remote_fail in 0u64..1000,
    ) {
        common::within(Duration::from_secs(30), move || {
            let local = Arc::new(Flaky { seed, fail_per_mille: local_fail, calls: AtomicU64::new(0), answered: AtomicU64::new(0) });
            let remote = Arc::new(Flaky { seed: seed ^ 1, fail_per_mille: remote_fail, calls: AtomicU64::new(0), answered: AtomicU64::new(0) });
            let rule_answers = Arc::new(AtomicU64::new(0));
            let ra = rule_answers.clone();
            let rules = move |id: &u64, _d: Deadline| -> Result<(u64, &'static str), BackendError> {
                ra.fetch_add(1, Ordering::SeqCst);
                Ok((*id, "rules"))
            };
            let config = RouterConfig {
                breaker: BreakerConfig { open_for: Duration::from_millis(5), ..Default::default() },
                retry: RetryConfig {
                    max_retries: 2,
                    initial_backoff: Duration::from_micros(100),
                    max_backoff: Duration::from_millis(1),
                    ..Default::default()
                },
                ..Default::default()
            };
            let router = Arc::new(
                Router::new(config, Arc::new(FixedGate::default())).unwrap()
                    .with_tier(TierSpec::new("local", Tier::Small, local.clone())).unwrap()
                    .with_tier(TierSpec::new("remote", Tier::Remote, remote.clone())).unwrap()
                    .with_tier(TierSpec::new("rules", Tier::RuleBased, Arc::new(rules))).unwrap(),
            );
            let answers: Answers = Arc::new(Mutex::new(HashMap::new()));
            let threads = 4u64;
            let per_thread = 25u64;
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let router = router.clone();
                    let answers = answers.clone();
                    std::thread::spawn(move || {
                        for k in 0..per_thread {
                            let id = t * 1000 + k;
                            let served = router
                                .serve(&TaskFeatures::with_tokens(10), &id, Deadline::after(Duration::from_secs(5)))
                                .expect("the rule-based tier never fails");
                            let (echo, who) = served.response;
                            let expected = match served.tier {
                                Tier::RuleBased => "rules",
                                _ => "flaky",
                            };
                            assert_eq!(who, expected);
                            assert_eq!(served.trail.last().map(|a| a.tier), Some(served.tier));
                            answers.lock().entry(id).or_default().push((echo, served.tier));
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("worker thread");
            }
            let answers = answers.lock();
            assert_eq!(answers.len() as u64, threads * per_thread, "no request lost");
            for (id, a) in answers.iter() {
                assert_eq!(a.len(), 1, "request {id} answered {} times", a.len());
                assert_eq!(a[0].0, *id, "request {id} got another request's answer");
            }
            let produced = local.answered.load(Ordering::SeqCst)
                + remote.answered.load(Ordering::SeqCst)
                + rule_answers.load(Ordering::SeqCst);
            assert_eq!(produced, threads * per_thread, "no tier answered a request another had answered");
        });
    }
}
