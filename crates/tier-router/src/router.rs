//! The router: picks the chain of tiers for a task, then serves it through the chain with
//! circuit breakers, retries and fallback, recording why each tier did or did not serve.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Deadline};
use crate::breaker::{BreakerConfig, BreakerStats, CircuitBreaker, Rejected};
use crate::complexity::{Complexity, ComplexityConfig, TaskFeatures};
use crate::error::{BackendError, Error};
use crate::pressure::{MemoryGate, PressureLevel};
use crate::retry::RetryConfig;
use crate::tier::{Placement, Tier};

/// The router's configuration: complexity rules, breaker and retry defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    /// How a task's features become a local tier.
    pub complexity: ComplexityConfig,
    /// Breaker settings for tiers registered without their own.
    pub breaker: BreakerConfig,
    /// Retry settings for transient errors.
    pub retry: RetryConfig,
}

impl RouterConfig {
    /// Checks every part.
    pub fn validate(&self) -> Result<(), Error> {
        self.complexity.validate()?;
        self.breaker.validate()?;
        self.retry.validate()
    }
}

/// A tier to register: its name, kind, placement, memory, and the backend that serves it.
pub struct TierSpec<Req: ?Sized, Resp> {
    name: String,
    tier: Tier,
    placement: Placement,
    memory_bytes: u64,
    breaker: Option<BreakerConfig>,
    backend: Arc<dyn Backend<Req, Resp>>,
}

impl<Req: ?Sized, Resp> fmt::Debug for TierSpec<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TierSpec")
            .field("name", &self.name)
            .field("tier", &self.tier)
            .field("placement", &self.placement)
            .field("memory_bytes", &self.memory_bytes)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl<Req: ?Sized, Resp> TierSpec<Req, Resp> {
    /// A tier named `name` of kind `tier`, served by `backend`, on the CPU, needing no memory.
    pub fn new(name: impl Into<String>, tier: Tier, backend: Arc<dyn Backend<Req, Resp>>) -> Self {
        Self {
            name: name.into(),
            tier,
            placement: Placement::Cpu,
            memory_bytes: 0,
            breaker: None,
            backend,
        }
    }

    /// Bytes the tier's model needs when loaded (checked against the memory gate unless the
    /// backend reports it is loaded already).
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    /// Where the tier computes.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Breaker settings for this tier instead of the router's.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = Some(config);
        self
    }
}

struct Entry<Req: ?Sized, Resp> {
    name: String,
    tier: Tier,
    placement: Placement,
    memory_bytes: u64,
    backend: Arc<dyn Backend<Req, Resp>>,
    breaker: CircuitBreaker,
}

/// Why a tier is in the chain at its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The local tier the task's complexity asks for.
    Chosen,
    /// A smaller local tier, tried when the chosen one cannot serve.
    Smaller,
    /// A larger local tier, tried when the chosen and smaller ones cannot serve.
    Larger,
    /// An accelerator tier, preferred because memory pressure is elevated or high.
    Offload,
    /// The remote tier.
    Remote,
    /// The rule-based tier, the last resort.
    LastResort,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Chosen => "chosen by complexity",
            Role::Smaller => "smaller local fallback",
            Role::Larger => "larger local fallback",
            Role::Offload => "accelerator offload under pressure",
            Role::Remote => "remote",
            Role::LastResort => "rule-based last resort",
        })
    }
}

/// A tier in the chain, in the order it will be tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The tier's registered name.
    pub name: String,
    /// Its kind.
    pub tier: Tier,
    /// Why it is in the chain.
    pub role: Role,
}

/// Why a tier will not be (or was not) tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkipReason {
    /// Its model does not fit under the memory budget now.
    MemoryDoesNotFit {
        /// Bytes the model needs.
        needed: u64,
        /// Bytes free under the budget.
        available: u64,
    },
    /// Pressure is high: no new local model is loaded on the CPU.
    NotLoadedUnderPressure(PressureLevel),
    /// Pressure is critical: only the rule-based tier serves.
    CriticalPressure,
    /// Its circuit breaker rejects calls.
    BreakerOpen(Rejected),
    /// The deadline passed before the tier's turn.
    DeadlineExpired,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::MemoryDoesNotFit { needed, available } => write!(
                f,
                "needs {needed} bytes, {available} free under the memory budget"
            ),
            SkipReason::NotLoadedUnderPressure(p) => {
                write!(f, "not loaded, and pressure is {p}: no new model is loaded")
            }
            SkipReason::CriticalPressure => {
                f.write_str("pressure is critical: only the rule-based tier serves")
            }
            SkipReason::BreakerOpen(r) => write!(f, "{r}"),
            SkipReason::DeadlineExpired => f.write_str("deadline passed before its turn"),
        }
    }
}

/// A tier left out of the chain, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The tier's registered name.
    pub name: String,
    /// Its kind.
    pub tier: Tier,
    /// Why it is left out.
    pub reason: SkipReason,
}

/// The outcome of `route()`: the chain of tiers to try and why, and the tiers left out and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteDecision {
    /// The task's complexity and the local tier it asks for.
    pub complexity: Complexity,
    /// The pressure level the decision was made under.
    pub pressure: PressureLevel,
    /// Bytes free under the memory budget at decision time.
    pub available_bytes: u64,
    /// Tiers to try, in order.
    pub chain: Vec<Candidate>,
    /// Tiers left out.
    pub skipped: Vec<Skipped>,
}

impl RouteDecision {
    /// The first tier of the chain, if any.
    pub fn first(&self) -> Option<&Candidate> {
        self.chain.first()
    }
}

impl fmt::Display for RouteDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.complexity;
        write!(
            f,
            "complexity {:.1} (tokens {:.1} + grade {:.1} + subject {:.1} + extra {:.1}) asks for {}; pressure {}, {} bytes free",
            c.score, c.from_tokens, c.from_grade, c.from_subject, c.extra, c.tier, self.pressure, self.available_bytes
        )?;
        for (k, cand) in self.chain.iter().enumerate() {
            write!(
                f,
                "\n  {}. {} ({}): {}",
                k + 1,
                cand.name,
                cand.tier,
                cand.role
            )?;
        }
        for s in &self.skipped {
            write!(f, "\n  skipped {} ({}): {}", s.name, s.tier, s.reason)?;
        }
        Ok(())
    }
}

/// What happened at one tier while serving a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// The tier served the request.
    Served {
        /// Attempts made (1 + retries).
        attempts: u32,
    },
    /// The tier was not tried.
    Skipped(SkipReason),
    /// The tier failed.
    Failed {
        /// Attempts made (1 + retries).
        attempts: u32,
        /// The last error.
        error: BackendError,
        /// Why no further retry was made.
        gave_up: GaveUp,
    },
}

/// Why the router stopped retrying a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GaveUp {
    /// The error is permanent.
    Permanent,
    /// `max_retries` retries were made.
    RetriesExhausted,
    /// The next backoff delay would reach past the deadline.
    Deadline,
    /// The breaker opened (or took its probes) during the retries.
    BreakerOpened,
}

/// One tier of the fallback chain and what happened there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempted {
    /// The tier's registered name.
    pub name: String,
    /// Its kind.
    pub tier: Tier,
    /// What happened.
    pub outcome: Outcome,
}

impl fmt::Display for Attempted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): ", self.name, self.tier)?;
        match &self.outcome {
            Outcome::Served { attempts } => write!(f, "served after {attempts} attempt(s)"),
            Outcome::Skipped(r) => write!(f, "skipped, {r}"),
            Outcome::Failed {
                attempts,
                error,
                gave_up,
            } => write!(
                f,
                "failed after {attempts} attempt(s) ({error}); gave up: {gave_up:?}"
            ),
        }
    }
}

/// A response and the record of how it was served.
#[derive(Debug, Clone)]
pub struct Served<Resp> {
    /// The response.
    pub response: Resp,
    /// The kind of tier that served it.
    pub tier: Tier,
    /// The registered name of the tier that served it.
    pub backend: String,
    /// The routing decision.
    pub decision: RouteDecision,
    /// Every tier with what happened there: those left out by routing, those that failed,
    /// and last the one that served.
    pub trail: Vec<Attempted>,
}

/// Routes tasks to tiers and serves them with breakers, retries and fallback. Share it between
/// threads with an `Arc`; every method takes `&self` (tiers are registered before, with
/// [`Router::with_tier`]).
pub struct Router<Req: ?Sized, Resp> {
    config: RouterConfig,
    gate: Arc<dyn MemoryGate>,
    entries: Vec<Entry<Req, Resp>>,
}

impl<Req: ?Sized, Resp> fmt::Debug for Router<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("config", &self.config)
            .field(
                "tiers",
                &self
                    .entries
                    .iter()
                    .map(|e| (&e.name, e.tier, e.placement, e.memory_bytes))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A router for sentence embeddings.
pub type EmbedRouter = Router<[String], Vec<Vec<f32>>>;

impl<Req: ?Sized, Resp> Router<Req, Resp> {
    /// A router with no tiers yet, asking `gate` about memory.
    pub fn new(config: RouterConfig, gate: Arc<dyn MemoryGate>) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            config,
            gate,
            entries: Vec::new(),
        })
    }

    /// The router with one more tier (the one way to register a tier:
    /// `Router::new(..)?.with_tier(a)?.with_tier(b)?`). Names must be
    /// unique. Registration order breaks ties between tiers of the same
    /// kind.
    pub fn with_tier(mut self, spec: TierSpec<Req, Resp>) -> Result<Self, Error> {
        if self.entries.iter().any(|e| e.name == spec.name) {
            return Err(Error::invalid(
                "tier.name",
                spec.name,
                "a name no other tier of the router has; register it under another name",
            ));
        }
        let breaker_config = spec.breaker.unwrap_or_else(|| self.config.breaker.clone());
        let breaker = CircuitBreaker::new(spec.name.clone(), breaker_config)?;
        self.entries.push(Entry {
            name: spec.name,
            tier: spec.tier,
            placement: spec.placement,
            memory_bytes: spec.memory_bytes,
            backend: spec.backend,
            breaker,
        });
        Ok(self)
    }

    /// The configuration.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The breaker of the tier named `name` (to register callbacks or read its state).
    pub fn breaker(&self, name: &str) -> Option<&CircuitBreaker> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| &e.breaker)
    }

    /// Breaker statistics of every tier, in registration order.
    pub fn stats(&self) -> Vec<(String, Tier, BreakerStats)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.tier, e.breaker.stats()))
            .collect()
    }

    /// Decides, without calling any backend, which tiers would serve `task` now and in what
    /// order, and why the others would not.
    ///
    /// Local tiers are ordered chosen, then smaller (largest first), then larger (smallest
    /// first); by pressure level:
    /// - `Normal`: local tiers, then remote, then rule-based.
    /// - `Elevated`: accelerator local tiers, remote, CPU local tiers, rule-based.
    /// - `High`: as `Elevated`, but CPU local tiers only if their model is loaded already.
    /// - `Critical`: rule-based only.
    ///
    /// A tier whose model is not loaded and does not fit the memory gate is skipped; so is one
    /// whose breaker is open.
    pub fn route(&self, task: &TaskFeatures) -> RouteDecision {
        let order = self.order(task);
        let mut chain = Vec::with_capacity(order.chain.len());
        let mut skipped = order.skipped;
        let now = Instant::now();
        for (idx, role) in order.chain {
            let e = &self.entries[idx];
            match e.breaker.check_at(now) {
                Ok(()) => chain.push(Candidate {
                    name: e.name.clone(),
                    tier: e.tier,
                    role,
                }),
                Err(r) => skipped.push(Skipped {
                    name: e.name.clone(),
                    tier: e.tier,
                    reason: SkipReason::BreakerOpen(r),
                }),
            }
        }
        RouteDecision {
            complexity: order.complexity,
            pressure: order.pressure,
            available_bytes: order.available,
            chain,
            skipped,
        }
    }

    fn order(&self, task: &TaskFeatures) -> Order {
        let complexity = self.config.complexity.score(task);
        let pressure = self.gate.pressure();
        let available = self.gate.available_bytes();
        let desired = complexity.tier.size_rank().unwrap_or(0);
        let mut skipped = Vec::new();
        let skip = |skipped: &mut Vec<Skipped>, e: &Entry<Req, Resp>, reason| {
            skipped.push(Skipped {
                name: e.name.clone(),
                tier: e.tier,
                reason,
            })
        };

        // Local tiers by closeness to the desired size: chosen, smaller (descending), larger.
        let mut locals: Vec<(usize, Role, (u8, u8))> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let r = e.tier.size_rank()?;
                let (role, key) = if r == desired {
                    (Role::Chosen, (0, 0))
                } else if r < desired {
                    (Role::Smaller, (1, desired - r))
                } else {
                    (Role::Larger, (2, r - desired))
                };
                Some((i, role, key))
            })
            .collect();
        locals.sort_by_key(|&(i, _, key)| (key, i));
        let remotes: Vec<usize> = self.indices(Tier::Remote);
        let rules: Vec<usize> = self.indices(Tier::RuleBased);

        let mut planned: Vec<(usize, Role)> = Vec::new();
        match pressure {
            PressureLevel::Normal => {
                planned.extend(locals.iter().map(|&(i, role, _)| (i, role)));
                planned.extend(remotes.iter().map(|&i| (i, Role::Remote)));
            }
            PressureLevel::Elevated | PressureLevel::High => {
                let (accel, cpu): (Vec<_>, Vec<_>) = locals
                    .iter()
                    .partition(|(i, _, _)| self.entries[*i].placement == Placement::Accelerator);
                planned.extend(accel.iter().map(|&(i, _, _)| (i, Role::Offload)));
                planned.extend(remotes.iter().map(|&i| (i, Role::Remote)));
                for &(i, role, _) in &cpu {
                    let e = &self.entries[i];
                    if pressure == PressureLevel::High && !e.backend.is_loaded() {
                        skip(
                            &mut skipped,
                            e,
                            SkipReason::NotLoadedUnderPressure(pressure),
                        );
                    } else {
                        planned.push((i, role));
                    }
                }
            }
            PressureLevel::Critical => {
                for &(i, _, _) in &locals {
                    skip(&mut skipped, &self.entries[i], SkipReason::CriticalPressure);
                }
                for &i in &remotes {
                    skip(&mut skipped, &self.entries[i], SkipReason::CriticalPressure);
                }
            }
        }
        planned.extend(rules.iter().map(|&i| (i, Role::LastResort)));

        let mut chain = Vec::with_capacity(planned.len());
        for (i, role) in planned {
            let e = &self.entries[i];
            if e.memory_bytes > 0 && !e.backend.is_loaded() && !self.gate.fits(e.memory_bytes) {
                skip(
                    &mut skipped,
                    e,
                    SkipReason::MemoryDoesNotFit {
                        needed: e.memory_bytes,
                        available,
                    },
                );
            } else {
                chain.push((i, role));
            }
        }
        Order {
            complexity,
            pressure,
            available,
            chain,
            skipped,
        }
    }

    fn indices(&self, tier: Tier) -> Vec<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.tier == tier)
            .map(|(i, _)| i)
            .collect()
    }

    /// Serves `request` for `task` before `deadline`: routes, then tries each tier of the chain
    /// in order, retrying transient errors with backoff while the breaker and the deadline
    /// allow, and falls back to the next tier on failure or an open breaker. Rule-based tiers
    /// are tried even after the deadline has passed. A panicking backend counts as a
    /// permanent failure of its tier.
    ///
    /// Returns the response with the record of every tier, or [`Error::Exhausted`] with the
    /// same record when no tier served.
    pub fn serve(
        &self,
        task: &TaskFeatures,
        request: &Req,
        deadline: Deadline,
    ) -> Result<Served<Resp>, Error> {
        if self.entries.is_empty() {
            return Err(Error::NoBackends);
        }
        let decision = self.route(task);
        let mut trail: Vec<Attempted> = decision
            .skipped
            .iter()
            .map(|s| Attempted {
                name: s.name.clone(),
                tier: s.tier,
                outcome: Outcome::Skipped(s.reason.clone()),
            })
            .collect();
        for cand in &decision.chain {
            let Some(e) = self.entries.iter().find(|e| e.name == cand.name) else {
                continue;
            };
            if e.tier != Tier::RuleBased && deadline.is_expired() {
                trail.push(attempted(e, Outcome::Skipped(SkipReason::DeadlineExpired)));
                continue;
            }
            match self.try_entry(e, request, deadline) {
                Ok((response, attempts)) => {
                    tracing::debug!(tier = %e.tier, backend = %e.name, attempts, "served");
                    trail.push(attempted(e, Outcome::Served { attempts }));
                    return Ok(Served {
                        response,
                        tier: e.tier,
                        backend: e.name.clone(),
                        decision,
                        trail,
                    });
                }
                Err(outcome) => {
                    tracing::debug!(backend = %e.name, ?outcome, "tier did not serve; falling back");
                    trail.push(attempted(e, outcome));
                }
            }
        }
        tracing::warn!(tiers = trail.len(), "no tier served the request");
        Err(Error::Exhausted { trail })
    }

    /// Tries one tier with retries. `Ok((response, attempts))` or the outcome to record.
    fn try_entry(
        &self,
        e: &Entry<Req, Resp>,
        request: &Req,
        deadline: Deadline,
    ) -> Result<(Resp, u32), Outcome> {
        let mut delays = self.config.retry.delays();
        let mut attempts = 0u32;
        let mut last_error: Option<BackendError> = None;
        loop {
            let permit = match e.breaker.try_acquire() {
                Ok(p) => p,
                Err(r) => {
                    // Before the first attempt: the tier is skipped. After a failed attempt
                    // (a concurrent caller opened the breaker or took the probe during the
                    // backoff): the tier failed, with the breaker as the reason to stop.
                    return Err(match last_error.take() {
                        None => Outcome::Skipped(SkipReason::BreakerOpen(r)),
                        Some(error) => failed(attempts, error, GaveUp::BreakerOpened),
                    });
                }
            };
            attempts += 1;
            let result = catch_unwind(AssertUnwindSafe(|| e.backend.call(request, deadline)))
                .unwrap_or_else(|panic| {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(BackendError::permanent(format!("backend panicked: {msg}")))
                });
            match result {
                Ok(resp) => {
                    permit.success();
                    return Ok((resp, attempts));
                }
                Err(error) => {
                    permit.failure();
                    if !error.is_transient() {
                        return Err(failed(attempts, error, GaveUp::Permanent));
                    }
                    let Some(delay) = delays.next() else {
                        return Err(failed(attempts, error, GaveUp::RetriesExhausted));
                    };
                    if deadline.remaining().is_some_and(|left| left <= delay) {
                        return Err(failed(attempts, error, GaveUp::Deadline));
                    }
                    if e.breaker.check_at(Instant::now() + delay).is_err() {
                        return Err(failed(attempts, error, GaveUp::BreakerOpened));
                    }
                    tracing::debug!(backend = %e.name, attempt = attempts, delay_ms = delay.as_millis() as u64, %error, "retrying");
                    last_error = Some(error);
                    std::thread::sleep(delay);
                }
            }
        }
    }
}

fn failed(attempts: u32, error: BackendError, gave_up: GaveUp) -> Outcome {
    Outcome::Failed {
        attempts,
        error,
        gave_up,
    }
}

fn attempted<Req: ?Sized, Resp>(e: &Entry<Req, Resp>, outcome: Outcome) -> Attempted {
    Attempted {
        name: e.name.clone(),
        tier: e.tier,
        outcome,
    }
}

struct Order {
    complexity: Complexity,
    pressure: PressureLevel,
    available: u64,
    chain: Vec<(usize, Role)>,
    skipped: Vec<Skipped>,
}

#[cfg(test)]
mod serde_tests {
    use std::time::Duration;

    use super::*;

    /// Durations serialize as milliseconds (numbers), never `{secs, nanos}` objects.
    #[test]
    fn durations_serialize_as_milliseconds() {
        let config = RouterConfig {
            breaker: BreakerConfig {
                slow_call: Some(Duration::from_millis(250)),
                ..Default::default()
            },
            ..Default::default()
        };
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["breaker"]["open_for"], 30_000.0);
        assert_eq!(json["breaker"]["slow_call"], 250.0);
        assert_eq!(json["retry"]["initial_backoff"], 50.0);
        assert_eq!(json["retry"]["max_backoff"], 1000.0);
        let back: RouterConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);

        let off = serde_json::to_value(BreakerConfig::default()).unwrap();
        assert!(off["slow_call"].is_null(), "{off}");
        let rejected = Rejected {
            state: crate::BreakerState::Open,
            retry_in: Some(Duration::from_millis(120)),
        };
        assert_eq!(serde_json::to_value(rejected).unwrap()["retry_in"], 120.0);
    }

    #[test]
    fn invalid_configuration_names_the_field_the_value_and_what_was_expected() {
        let e = RetryConfig {
            factor: 0.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: retry.factor = 0.5: expected a finite number of at least 1 (default 2)"
        );
        assert!(matches!(e, Error::InvalidConfig { ref field, .. } if field == "retry.factor"));
    }
}
