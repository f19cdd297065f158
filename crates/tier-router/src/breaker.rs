//! A circuit breaker per backend: closed → open → half-open → closed.
//!
//! - **Closed**: every call is admitted. The breaker opens when `failures` calls in a row have
//!   failed, or when at least `min_calls` of the last `window` calls are recorded and the share
//!   of failures among them is `failure_rate` or more.
//! - **Open**: calls are rejected for `open_for`.
//! - **Half-open**: after `open_for`, the next call is admitted as a probe, up to
//!   `half_open_probes` probes in all. One failed probe opens the breaker again for `open_for`;
//!   when all `half_open_probes` probes have succeeded it closes, with a fresh window.
//!
//! A successful call slower than `slow_call` (when set) counts as a failure. An outcome from a
//! call admitted before the last transition changes the statistics but not the state. A
//! [`Permit`] dropped without an outcome counts as a failure.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// When a breaker opens, how long it stays open, and how it probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 3; 0 turns this rule off.
    pub failures: u32,
    /// Failure share over the window that opens the breaker (0–1]. Default 0.5.
    pub failure_rate: f32,
    /// Number of most recent calls the failure rate is computed over. Default 20.
    pub window: usize,
    /// Calls needed in the window before the failure rate is considered. Default 10.
    pub min_calls: usize,
    /// How long the breaker stays open before admitting probes, in milliseconds in serde.
    /// Default 30 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub open_for: Duration,
    /// Probes admitted when half-open; all must succeed to close. Default 1.
    pub half_open_probes: u32,
    /// A successful call slower than this counts as a failure, in milliseconds in serde.
    /// Default `None` (off).
    #[serde(with = "serde_with::As::<Option<serde_with::DurationMilliSeconds<f64>>>")]
    pub slow_call: Option<Duration>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 3,
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
            slow_call: None,
        }
    }
}

impl BreakerConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(Error::invalid(
                "breaker.failure_rate",
                self.failure_rate,
                "a share in (0, 1] (default 0.5)",
            ));
        }
        if self.window == 0 {
            return Err(Error::invalid(
                "breaker.window",
                0,
                "at least 1 (default 20)",
            ));
        }
        if self.min_calls == 0 || self.min_calls > self.window {
            return Err(Error::invalid(
                "breaker.min_calls",
                self.min_calls,
                "between 1 and `window` (defaults 10 of 20)",
            ));
        }
        if self.half_open_probes == 0 {
            return Err(Error::invalid(
                "breaker.half_open_probes",
                0,
                "at least 1 (default 1), or the breaker could never close",
            ));
        }
        Ok(())
    }
}

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are rejected until `open_for` has passed.
    Open,
    /// A limited number of probe calls are admitted.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        })
    }
}

/// Why a breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum TransitionReason {
    /// This many calls in a row failed.
    ConsecutiveFailures(u32),
    /// `failures` of the last `calls` calls failed.
    FailureRate {
        /// Failures in the window.
        failures: usize,
        /// Calls in the window.
        calls: usize,
    },
    /// `open_for` passed; a probe is admitted.
    OpenElapsed,
    /// A half-open probe failed.
    ProbeFailed,
    /// All half-open probes succeeded.
    ProbesSucceeded(u32),
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransitionReason::ConsecutiveFailures(n) => write!(f, "{n} consecutive failures"),
            TransitionReason::FailureRate { failures, calls } => {
                write!(f, "{failures} of the last {calls} calls failed")
            }
            TransitionReason::OpenElapsed => f.write_str("open period elapsed"),
            TransitionReason::ProbeFailed => f.write_str("half-open probe failed"),
            TransitionReason::ProbesSucceeded(n) => write!(f, "{n} half-open probe(s) succeeded"),
        }
    }
}

/// A change of state, passed to the callbacks registered with
/// [`CircuitBreaker::on_transition`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
    /// Why.
    pub reason: TransitionReason,
    /// When.
    pub at: Instant,
}

/// Counters and the current state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerStats {
    /// State now.
    pub state: BreakerState,
    /// Calls admitted.
    pub admitted: u64,
    /// Calls rejected because the breaker was open or its probes were taken.
    pub rejected: u64,
    /// Outcomes recorded as success.
    pub successes: u64,
    /// Outcomes recorded as failure (slow calls and abandoned permits included).
    pub failures: u64,
    /// Successful calls counted as failures for being slower than `slow_call`.
    pub slow_calls: u64,
    /// Times the breaker opened.
    pub times_opened: u64,
    /// Failures in a row now.
    pub consecutive_failures: u32,
    /// Calls in the sliding window now.
    pub window_calls: usize,
    /// Failures in the sliding window now.
    pub window_failures: usize,
}

/// Why a call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The breaker's state.
    pub state: BreakerState,
    /// How long until the breaker admits a probe (`None` when half-open with its probes taken),
    /// in milliseconds in serde.
    #[serde(with = "serde_with::As::<Option<serde_with::DurationMilliSeconds<f64>>>")]
    pub retry_in: Option<Duration>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_in {
            Some(d) => write!(
                f,
                "circuit {}; next probe in {} ms",
                self.state,
                d.as_millis()
            ),
            None => write!(f, "circuit {}; all probes in flight", self.state),
        }
    }
}

/// The outcome of a call, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CallOutcome {
    /// The call succeeded (a failure after all if slower than `slow_call`).
    Success,
    /// The call failed.
    Failure,
}

type Callback = Arc<dyn Fn(&Transition) + Send + Sync>;

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    generation: u64,
    window: VecDeque<bool>,
    window_failures: usize,
    consecutive: u32,
    open_until: Option<Instant>,
    probes_admitted: u32,
    probes_succeeded: u32,
    admitted: u64,
    rejected: u64,
    successes: u64,
    failures: u64,
    slow_calls: u64,
    times_opened: u64,
}

/// A circuit breaker. Cheap to share: all methods take `&self`.
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    callbacks: RwLock<Vec<Callback>>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("inner", &*self.inner.lock())
            .field("callbacks", &self.callbacks.read().len())
            .finish()
    }
}

/// Admission to make one call. Record its outcome with [`Permit::success`],
/// [`Permit::failure`] or [`Permit::record_at`]; dropping it unrecorded counts as a failure.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    generation: u64,
    started: Instant,
    probe: bool,
    done: bool,
}

impl Permit<'_> {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records a success now.
    pub fn success(self) {
        self.record_at(CallOutcome::Success, Instant::now());
    }

    /// Records a failure now.
    pub fn failure(self) {
        self.record_at(CallOutcome::Failure, Instant::now());
    }

    /// Records `outcome` as of `now` (the call's duration is `now` minus admission time).
    pub fn record_at(mut self, outcome: CallOutcome, now: Instant) {
        self.done = true;
        let elapsed = now.saturating_duration_since(self.started);
        self.breaker
            .record(self.generation, self.probe, outcome, elapsed, now);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(self.started);
            self.breaker.record(
                self.generation,
                self.probe,
                CallOutcome::Failure,
                elapsed,
                now,
            );
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker. Fails if the configuration is invalid.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            name: name.into(),
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                generation: 0,
                window: VecDeque::with_capacity(config.window),
                window_failures: 0,
                consecutive: 0,
                open_until: None,
                probes_admitted: 0,
                probes_succeeded: 0,
                admitted: 0,
                rejected: 0,
                successes: 0,
                failures: 0,
                slow_calls: 0,
                times_opened: 0,
            }),
            config,
            callbacks: RwLock::new(Vec::new()),
        })
    }

    /// The breaker's name (its backend's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Registers a callback called on every state change, after the change, outside the lock.
    pub fn on_transition(&self, f: impl Fn(&Transition) + Send + Sync + 'static) {
        self.callbacks.write().push(Arc::new(f));
    }

    /// The state now (an open breaker whose `open_for` has passed reads `Open` until the next
    /// call is admitted as a probe).
    pub fn state(&self) -> BreakerState {
        self.inner.lock().state
    }

    /// Counters and state.
    pub fn stats(&self) -> BreakerStats {
        let i = self.inner.lock();
        BreakerStats {
            state: i.state,
            admitted: i.admitted,
            rejected: i.rejected,
            successes: i.successes,
            failures: i.failures,
            slow_calls: i.slow_calls,
            times_opened: i.times_opened,
            consecutive_failures: i.consecutive,
            window_calls: i.window.len(),
            window_failures: i.window_failures,
        }
    }

    /// Asks to make a call now.
    pub fn try_acquire(&self) -> Result<Permit<'_>, Rejected> {
        self.try_acquire_at(Instant::now())
    }

    /// Whether a call would be admitted at `now`, without admitting one.
    pub fn check_at(&self, now: Instant) -> Result<(), Rejected> {
        let i = self.inner.lock();
        match i.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open => match i.open_until {
                Some(until) if now < until => Err(Rejected {
                    state: BreakerState::Open,
                    retry_in: Some(until - now),
                }),
                _ => Ok(()),
            },
            BreakerState::HalfOpen => {
                if i.probes_admitted < self.config.half_open_probes {
                    Ok(())
                } else {
                    Err(Rejected {
                        state: BreakerState::HalfOpen,
                        retry_in: None,
                    })
                }
            }
        }
    }

    /// Asks to make a call at `now` (for callers that keep their own clock).
    pub fn try_acquire_at(&self, now: Instant) -> Result<Permit<'_>, Rejected> {
        let mut transition = None;
        let result = {
            let mut i = self.inner.lock();
            if i.state == BreakerState::Open {
                match i.open_until {
                    Some(until) if now < until => {}
                    _ => {
                        transition = Some(self.transition(
                            &mut i,
                            BreakerState::HalfOpen,
                            TransitionReason::OpenElapsed,
                            now,
                        ));
                    }
                }
            }
            match i.state {
                BreakerState::Closed => {
                    i.admitted += 1;
                    Ok((i.generation, false))
                }
                BreakerState::Open => {
                    i.rejected += 1;
                    Err(Rejected {
                        state: BreakerState::Open,
                        retry_in: i.open_until.map(|u| u.saturating_duration_since(now)),
                    })
                }
                BreakerState::HalfOpen => {
                    if i.probes_admitted < self.config.half_open_probes {
                        i.probes_admitted += 1;
                        i.admitted += 1;
                        Ok((i.generation, true))
                    } else {
                        i.rejected += 1;
                        Err(Rejected {
                            state: BreakerState::HalfOpen,
                            retry_in: None,
                        })
                    }
                }
            }
        };
        if let Some(t) = transition {
            self.emit(&t);
        }
        result.map(|(generation, probe)| Permit {
            breaker: self,
            generation,
            started: now,
            probe,
            done: false,
        })
    }

    fn record(
        &self,
        generation: u64,
        probe: bool,
        outcome: CallOutcome,
        elapsed: Duration,
        now: Instant,
    ) {
        let slow = outcome == CallOutcome::Success
            && self.config.slow_call.is_some_and(|limit| elapsed > limit);
        let failed = outcome == CallOutcome::Failure || slow;
        let mut transition = None;
        {
            let mut i = self.inner.lock();
            if failed {
                i.failures += 1;
            } else {
                i.successes += 1;
            }
            if slow {
                i.slow_calls += 1;
            }
            if generation != i.generation {
                // Admitted before the last transition: counted, but it does not move the state.
                return;
            }
            match i.state {
                BreakerState::Closed => {
                    if i.window.len() == self.config.window && i.window.pop_front() == Some(true) {
                        i.window_failures -= 1;
                    }
                    i.window.push_back(failed);
                    if failed {
                        i.window_failures += 1;
                        i.consecutive += 1;
                    } else {
                        i.consecutive = 0;
                    }
                    let calls = i.window.len();
                    let rate_trips = calls >= self.config.min_calls
                        && i.window_failures as f64
                            >= self.config.failure_rate as f64 * calls as f64;
                    if self.config.failures > 0 && i.consecutive >= self.config.failures {
                        let n = i.consecutive;
                        transition = Some(self.transition(
                            &mut i,
                            BreakerState::Open,
                            TransitionReason::ConsecutiveFailures(n),
                            now,
                        ));
                    } else if rate_trips {
                        let failures = i.window_failures;
                        transition = Some(self.transition(
                            &mut i,
                            BreakerState::Open,
                            TransitionReason::FailureRate { failures, calls },
                            now,
                        ));
                    }
                }
                BreakerState::HalfOpen if probe => {
                    if failed {
                        transition = Some(self.transition(
                            &mut i,
                            BreakerState::Open,
                            TransitionReason::ProbeFailed,
                            now,
                        ));
                    } else {
                        i.probes_succeeded += 1;
                        if i.probes_succeeded >= self.config.half_open_probes {
                            let n = i.probes_succeeded;
                            transition = Some(self.transition(
                                &mut i,
                                BreakerState::Closed,
                                TransitionReason::ProbesSucceeded(n),
                                now,
                            ));
                        }
                    }
                }
                BreakerState::HalfOpen | BreakerState::Open => {}
            }
        }
        if let Some(t) = transition {
            self.emit(&t);
        }
    }

    fn transition(
        &self,
        i: &mut Inner,
        to: BreakerState,
        reason: TransitionReason,
        now: Instant,
    ) -> Transition {
        let from = i.state;
        i.state = to;
        i.generation += 1;
        i.probes_admitted = 0;
        i.probes_succeeded = 0;
        match to {
            BreakerState::Open => {
                i.open_until = Some(now + self.config.open_for);
                i.times_opened += 1;
            }
            BreakerState::Closed => {
                i.open_until = None;
                i.window.clear();
                i.window_failures = 0;
                i.consecutive = 0;
            }
            BreakerState::HalfOpen => {}
        }
        Transition {
            from,
            to,
            reason,
            at: now,
        }
    }

    fn emit(&self, t: &Transition) {
        match t.to {
            BreakerState::Open => {
                tracing::warn!(breaker = %self.name, from = %t.from, reason = %t.reason, "circuit opened")
            }
            _ => {
                tracing::info!(breaker = %self.name, from = %t.from, to = %t.to, reason = %t.reason, "circuit state changed")
            }
        }
        let callbacks: Vec<Callback> = self.callbacks.read().clone();
        for cb in callbacks {
            cb(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            open_for: Duration::from_millis(100),
            ..Default::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_and_closes() {
        let b = CircuitBreaker::new("t", cfg()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        b.on_transition(move |t| s.lock().push((t.from, t.to, t.reason)));
        let t0 = Instant::now();
        for _ in 0..3 {
            b.try_acquire_at(t0)
                .unwrap()
                .record_at(CallOutcome::Failure, t0);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let r = b
            .try_acquire_at(t0 + Duration::from_millis(50))
            .unwrap_err();
        assert_eq!(r.retry_in, Some(Duration::from_millis(50)));
        let t1 = t0 + Duration::from_millis(100);
        let p = b.try_acquire_at(t1).unwrap();
        assert!(p.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // Only one probe at a time by default.
        assert!(b.try_acquire_at(t1).is_err());
        p.record_at(CallOutcome::Success, t1);
        assert_eq!(b.state(), BreakerState::Closed);
        let seen = seen.lock().clone();
        assert_eq!(
            seen,
            vec![
                (
                    BreakerState::Closed,
                    BreakerState::Open,
                    TransitionReason::ConsecutiveFailures(3)
                ),
                (
                    BreakerState::Open,
                    BreakerState::HalfOpen,
                    TransitionReason::OpenElapsed
                ),
                (
                    BreakerState::HalfOpen,
                    BreakerState::Closed,
                    TransitionReason::ProbesSucceeded(1)
                ),
            ]
        );
        let st = b.stats();
        assert_eq!(
            (st.failures, st.successes, st.rejected, st.times_opened),
            (3, 1, 2, 1)
        );
    }

    #[test]
    fn failure_rate_over_window_opens() {
        let b = CircuitBreaker::new("t", cfg()).unwrap();
        let t0 = Instant::now();
        // Alternate failure/success: never 3 in a row, but 5 of 10 = 50% at the 10th call.
        for k in 0..10 {
            let outcome = if k % 2 == 0 {
                CallOutcome::Failure
            } else {
                CallOutcome::Success
            };
            assert_eq!(b.state(), BreakerState::Closed, "call {k}");
            b.try_acquire_at(t0).unwrap().record_at(outcome, t0);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn slow_calls_count_as_failures_and_dropped_permits_fail() {
        let b = CircuitBreaker::new(
            "t",
            BreakerConfig {
                slow_call: Some(Duration::from_millis(10)),
                ..cfg()
            },
        )
        .unwrap();
        let t0 = Instant::now();
        b.try_acquire_at(t0)
            .unwrap()
            .record_at(CallOutcome::Success, t0 + Duration::from_millis(20));
        drop(b.try_acquire_at(t0).unwrap());
        assert_eq!(b.stats().consecutive_failures, 2);
        assert_eq!(b.stats().slow_calls, 1);
        b.try_acquire_at(t0)
            .unwrap()
            .record_at(CallOutcome::Success, t0 + Duration::from_millis(5));
        assert_eq!(b.stats().consecutive_failures, 0);
    }

    #[test]
    fn stale_outcomes_do_not_move_state() {
        let b = CircuitBreaker::new("t", cfg()).unwrap();
        let t0 = Instant::now();
        let stale = b.try_acquire_at(t0).unwrap();
        for _ in 0..3 {
            b.try_acquire_at(t0)
                .unwrap()
                .record_at(CallOutcome::Failure, t0);
        }
        assert_eq!(b.state(), BreakerState::Open);
        stale.record_at(CallOutcome::Success, t0);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn invalid_config_names_the_field() {
        let e = CircuitBreaker::new(
            "t",
            BreakerConfig {
                min_calls: 30,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("min_calls"));
    }
}
