//! Serving generation: [`Runtime::generate`] picks the tier (a named model,
//! or by complexity for [`AUTO`]), admits the sequence into that decoder's
//! step loop (or streams it from the remote tier), and falls to the next
//! tier with the reason when a tier cannot serve; the rule-based tier
//! answers last with a labelled degraded answer.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::generation::{
    FinishReason, Finished, GenerateRequest, Generation, GenerationEvent, Prompt, Served, Timings,
    Usage,
};
use crate::runtime::Runtime;

/// The model name that lets the runtime choose the tier by complexity.
pub const AUTO: &str = "auto";

/// The name the rule-based tier answers under.
pub const RULE_BASED: &str = "rule-based";

/// What kind of work a registered model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Sentence embeddings.
    Embedding,
    /// Text generation.
    Generative,
}

/// A registered model, for listings (`GET /v1/models`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// Its name.
    pub name: String,
    /// What it does.
    pub kind: ModelKind,
    /// Its tier, for generative models.
    pub tier: Option<tier_router::Tier>,
}

impl Runtime {
    /// Every registered model, embedding models first, by name.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut v: Vec<ModelInfo> = self
            .inner
            .registry
            .names()
            .into_iter()
            .map(|name| ModelInfo {
                name,
                kind: ModelKind::Embedding,
                tier: None,
            })
            .collect();
        v.extend(
            self.inner
                .decoders
                .tiers()
                .into_iter()
                .map(|(name, tier)| ModelInfo {
                    name,
                    kind: ModelKind::Generative,
                    tier: Some(tier),
                }),
        );
        #[cfg(feature = "remote")]
        if let Some(r) = &self.inner.remote_generation {
            if !v.iter().any(|m| m.name == r.model()) {
                v.push(ModelInfo {
                    name: r.model().to_string(),
                    kind: ModelKind::Generative,
                    tier: Some(tier_router::Tier::Remote),
                });
            }
        }
        v
    }

    /// Whether a remote generation tier is configured.
    fn has_remote_generation(&self) -> bool {
        #[cfg(feature = "remote")]
        return self.inner.remote_generation.is_some();
        #[cfg(not(feature = "remote"))]
        false
    }

    /// The error for a name no model has, listing the names that exist.
    pub(crate) fn unknown(&self, name: &str) -> Error {
        let mut known: Vec<String> = self.models().into_iter().map(|m| m.name).collect();
        if !self.inner.decoders.names().is_empty() || self.has_remote_generation() {
            known.push(AUTO.to_string());
        }
        Error::unknown_model(name, known)
    }

    /// The tier [`AUTO`] picks for `req` with `prompt_tokens` tokens of
    /// prompt, with its score.
    pub fn generation_complexity(
        &self,
        req: &GenerateRequest,
        prompt_tokens: usize,
    ) -> tier_router::Complexity {
        let features = tier_router::TaskFeatures {
            tokens: prompt_tokens,
            output_tokens: req.max_tokens,
            difficulty: req.difficulty,
            ..tier_router::TaskFeatures::default()
        };
        self.inner.config.complexity.score(&features)
    }

    /// Generates a continuation of `req` with `model` (a registered
    /// generative model, or [`AUTO`] to choose by complexity). The returned
    /// [`Generation`] streams text as it comes and ends with exactly one
    /// final event; it says which tier and model served it. A tier that
    /// cannot serve (the model does not fit, fails to load) passes to the
    /// next with the reason; the rule-based tier answers last, labelled as
    /// degraded. Errors: an unknown model, invalid input, or a full queue
    /// ([`Error::Overloaded`]).
    ///
    /// With a remote tier ([`RuntimeConfig::remote_generation`], feature
    /// `remote`), the order is: under `Normal` pressure the local tiers
    /// first, then the remote, then the rule-based tier; under `Elevated`,
    /// `High` or `Critical` pressure (the pressure monitor's level, as for
    /// embeddings) the remote first, as it takes no local memory. A named
    /// local model is tried first whatever the pressure, then the remote;
    /// the remote's model name asks for the remote alone. The remote tier
    /// is skipped while its breaker is open (the reason in the trail), and
    /// a request it fails before its first text falls to the next tier; the
    /// call returns once the remote's first text has arrived.
    ///
    /// [`RuntimeConfig::remote_generation`]: crate::RuntimeConfig
    pub fn generate(&self, model: &str, req: GenerateRequest) -> Result<Generation> {
        let started = Instant::now();
        let decoders = &self.inner.decoders;
        if req.max_tokens == 0 {
            return Err(Error::InvalidInput(
                "max_tokens is 0: ask for at least one token".into(),
            ));
        }
        if req.max_tokens > self.inner.config.max_generate_tokens {
            return Err(Error::InvalidInput(format!(
                "max_tokens = {} is over the limit of {}; ask for fewer",
                req.max_tokens, self.inner.config.max_generate_tokens
            )));
        }
        req.sampling
            .validate()
            .map_err(|e| Error::InvalidInput(format!("sampling: {e}")))?;
        let tiers = decoders.tiers();
        let remote = self.has_remote_generation();
        let remote_name = self.remote_generation_name();
        let chain: Vec<(String, tier_router::Tier)> = if model == AUTO {
            let words = prompt_words(&req.prompt);
            let want = self.generation_complexity(&req, words).tier;
            let mut chain = tiers.clone();
            // The wanted tier first, then the others nearest to it.
            chain.sort_by_key(|(n, t)| (tier_distance(*t, want), n.clone()));
            chain
        } else if let Some(t) = tiers.iter().find(|(n, _)| n == model) {
            vec![t.clone()]
        } else if remote && remote_name.as_deref() == Some(model) {
            Vec::new()
        } else {
            return Err(self.unknown(model));
        };
        let mut steps: Vec<Step> = chain
            .into_iter()
            .map(|(name, tier)| Step::Local(name, tier))
            .collect();
        if remote {
            let level = self.inner.monitor.level();
            let pressured = level != mem_budget::PressureLevel::Normal;
            if model == AUTO && pressured {
                steps.insert(0, Step::Remote);
            } else {
                steps.push(Step::Remote);
            }
        }
        let mut trail = Vec::new();
        for step in steps {
            let (name, tier) = match step {
                Step::Local(name, tier) => (name, tier),
                Step::Remote => {
                    if let Some(g) = self.try_remote(&req, &mut trail, started) {
                        return Ok(g);
                    }
                    continue;
                }
            };
            let loaded = match decoders.get(&name) {
                Ok(l) => l,
                Err(e) => {
                    trail.push(format!("{tier} {name}: {}", error_chain(&e)));
                    continue;
                }
            };
            let prepared = match loaded.prepare(&req) {
                Ok(p) => p,
                Err(e @ Error::InvalidInput(_)) => return Err(e),
                // A named model refuses with the numbers; `auto` tries on.
                Err(e @ Error::KvTooLarge { .. }) if model != AUTO => return Err(e),
                Err(e) => {
                    trail.push(format!("{tier} {name}: {}", error_chain(&e)));
                    continue;
                }
            };
            let served = Served {
                tier,
                model: name.clone(),
                trail: trail.clone(),
            };
            let (mut generation, sink) = Generation::channel(served.clone());
            let seq = loaded.sequence(prepared, &req, sink, served, started)?;
            let options = batcher::JoinOptions {
                priority: req.priority,
                deadline: req.deadline.map(|d| started + d),
            };
            match loaded.engine.join(seq, options) {
                Ok(handle) => {
                    generation.attach(handle);
                    return Ok(generation);
                }
                Err(batcher::Error::QueueFull { queued, max_queued }) => {
                    return Err(Error::Overloaded {
                        model: name,
                        queued,
                        max_queued,
                    })
                }
                Err(e) => trail.push(format!("{tier} {name}: {e}")),
            }
        }
        if trail.is_empty() {
            trail.push("no generative model is registered".into());
        }
        Ok(rule_based(&req, trail, started))
    }
}

/// One tier of a generation's chain.
enum Step {
    /// A registered decoder.
    Local(String, tier_router::Tier),
    /// The remote generation tier.
    Remote,
}

impl Runtime {
    fn remote_generation_name(&self) -> Option<String> {
        #[cfg(feature = "remote")]
        return self
            .inner
            .remote_generation
            .as_ref()
            .map(|r| r.model().to_string());
        #[cfg(not(feature = "remote"))]
        None
    }

    /// Streams `req` from the remote tier, or records why it did not serve.
    #[cfg_attr(not(feature = "remote"), allow(unused_variables))]
    fn try_remote(
        &self,
        req: &GenerateRequest,
        trail: &mut Vec<String>,
        started: Instant,
    ) -> Option<Generation> {
        #[cfg(feature = "remote")]
        if let Some(r) = &self.inner.remote_generation {
            match r.start(req, trail.clone(), started) {
                Ok(g) => return Some(g),
                Err(reason) => trail.push(format!("remote {}: {reason}", r.model())),
            }
        }
        None
    }
}

/// Words of the prompt: the complexity estimate before any tokenizer is
/// loaded (a word is about one token and a third in English; the score's
/// thresholds are coarse enough for it).
fn prompt_words(p: &Prompt) -> usize {
    match p {
        Prompt::Text(t) => t.split_whitespace().count(),
        Prompt::Chat(m) => m.iter().map(|m| m.content.split_whitespace().count()).sum(),
    }
}

fn tier_distance(t: tier_router::Tier, want: tier_router::Tier) -> (u8, u8) {
    let rank = |t: tier_router::Tier| match t {
        tier_router::Tier::Small => 0i8,
        tier_router::Tier::Medium => 1,
        _ => 2,
    };
    let d = rank(t) - rank(want);
    // Equal first, then smaller (cheaper) before larger at the same distance.
    (d.unsigned_abs(), u8::from(d > 0))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The rule-based tier's answer: a fixed, labelled notice that no model
/// served, with the reasons. It never fails and never pretends to be a
/// model's output.
fn rule_based(req: &GenerateRequest, trail: Vec<String>, started: Instant) -> Generation {
    let served = Served {
        tier: tier_router::Tier::RuleBased,
        model: RULE_BASED.to_string(),
        trail: trail.clone(),
    };
    let (generation, sink) = Generation::channel(served.clone());
    let text = format!(
        "[degraded answer from snug's rule-based tier: no model served this request ({})]",
        trail.join("; ")
    );
    sink.send(GenerationEvent::Delta {
        text,
        tokens: Vec::new(),
    });
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = req;
    sink.send(GenerationEvent::Finished(Finished {
        reason: FinishReason::Stop,
        error: None,
        usage: Usage::default(),
        timings: Timings {
            queued_ms: 0.0,
            time_to_first_token_ms: None,
            total_ms,
        },
        served,
    }));
    generation
}
