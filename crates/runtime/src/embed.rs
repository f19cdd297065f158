//! Serving embeddings: `embed`, `embed_with`, the pre-flight `estimate`,
//! and the local tier's backend.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::plan::minilm_shape;
use crate::registry::Registry;
use crate::runtime::Runtime;

/// Embeddings for a request, and how they were served.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Embeddings {
    /// One unit vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Texts answered from the cache.
    pub cache_hits: usize,
    /// The tier that served the rest (`None` when all were cached).
    pub tier: Option<tier_router::Tier>,
    /// The backend that served the rest.
    pub backend: Option<String>,
    /// What happened at each tier, in words (empty when all were cached).
    pub trail: Vec<String>,
}

/// Options of one `embed` call.
#[derive(Debug, Clone, Default)]
pub struct EmbedOptions {
    /// Deadline (default: the configured request timeout).
    pub timeout: Option<Duration>,
}

/// The pre-flight answer for a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestEstimate {
    /// Texts in the request.
    pub texts: usize,
    /// Tokens in all (after truncation).
    pub tokens: u64,
    /// Tokens of the longest text.
    pub longest: u64,
    /// The memory estimate against the room left now.
    pub estimate: mem_budget::Estimate,
}

impl Runtime {
    /// Embeds texts with the default model (the first registered, MiniLM
    /// when it is present): one unit vector per text, from the cache, the
    /// local model through its batcher, the remote tier or the rule-based
    /// tier, whichever the router's chain reaches first.
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings> {
        self.embed_with(texts, &EmbedOptions::default())
    }

    /// Embeds texts with options.
    pub fn embed_with(&self, texts: &[&str], options: &EmbedOptions) -> Result<Embeddings> {
        let inner = &self.inner;
        if texts.is_empty() {
            return Err(Error::InvalidInput(
                "no texts to embed: pass at least one".into(),
            ));
        }
        if texts.len() > inner.config.max_texts {
            return Err(Error::InvalidInput(format!(
                "{} texts in one request, over the limit of {}; split the request",
                texts.len(),
                inner.config.max_texts
            )));
        }
        if let Some((i, t)) = texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > inner.config.max_text_bytes)
        {
            return Err(Error::InvalidInput(format!(
                "text {i} is {} bytes, over the limit of {}; split long documents with runtime::chunk::Chunker",
                t.len(),
                inner.config.max_text_bytes
            )));
        }
        let model = inner.default_model.clone();
        let version = match &model {
            Some(m) => inner.registry.version(m)?,
            None => "rule-based".to_string(),
        };
        // 1. The cache.
        let key = |t: &str| format!("{version}\u{1f}{t}");
        let mut out: Vec<Option<Vec<f32>>> = texts
            .iter()
            .map(|t| inner.cache.get(&key(t)).map(|v| v.to_vec()))
            .collect();
        let hits = out.iter().filter(|v| v.is_some()).count();
        let misses: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
        if misses.is_empty() {
            return Ok(Embeddings {
                vectors: out.into_iter().flatten().collect(),
                cache_hits: hits,
                tier: None,
                backend: None,
                trail: Vec::new(),
            });
        }
        // 2. The router picks the tier; 3. the tier serves.
        let miss_texts: Vec<String> = misses.iter().map(|&i| texts[i].to_string()).collect();
        let words: usize = miss_texts
            .iter()
            .map(|t| t.split_whitespace().count())
            .max()
            .unwrap_or(0);
        let features = tier_router::TaskFeatures::with_tokens((words * 4).div_ceil(3) + 2);
        let timeout = options.timeout.unwrap_or(inner.config.request_timeout);
        let deadline = tier_router::Deadline::after(timeout);
        let served = inner.router.serve(&features, &miss_texts[..], deadline)?;
        if served.response.len() != miss_texts.len() {
            return Err(Error::Backend(format!(
                "tier {} answered {} vectors for {} texts",
                served.backend,
                served.response.len(),
                miss_texts.len()
            )));
        }
        // 4. Only the model's own answers are cached under its version.
        let cacheable = model.as_deref() == Some(served.backend.as_str());
        for (&i, v) in misses.iter().zip(served.response) {
            if cacheable {
                if let Err(e) = inner.cache.insert(key(texts[i]), Arc::new(v.clone())) {
                    tracing::debug!(error = %e, "embedding not cached");
                }
            }
            out[i] = Some(v);
        }
        Ok(Embeddings {
            vectors: out.into_iter().flatten().collect(),
            cache_hits: hits,
            tier: Some(served.tier),
            backend: Some(served.backend),
            trail: served.trail.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// The pre-flight answer for embedding `texts` in one batch: whether it
    /// fits the memory left now, and if not, the longest input that does.
    pub fn estimate(&self, texts: &[&str]) -> Result<RequestEstimate> {
        let inner = &self.inner;
        let Some(model) = inner.default_model.as_ref() else {
            return Err(Error::InvalidInput(
                "no local model is registered to estimate for".into(),
            ));
        };
        let loaded = inner.registry.get(model)?;
        let tokens = loaded.model.tokenize(texts)?;
        let total: u64 = tokens.iter().map(|t| t.len() as u64).sum();
        let longest = tokens.iter().map(|t| t.len() as u64).max().unwrap_or(0);
        let shape = minilm_shape();
        let work = mem_budget::Workload {
            batch: texts.len().max(1) as u64,
            seq: longest.max(1),
        };
        let act = mem_budget::Activations::estimate(
            &shape,
            work,
            &mem_budget::ActivationConfig::default(),
        );
        let room = mem_budget::Room::in_ledger(inner.registry.ledger())?;
        let fits = act.total <= room.activations.min(room.total);
        let max_tokens = (1..=loaded.model.max_tokens() as u64).rev().find(|&s| {
            let a = mem_budget::Activations::estimate(
                &shape,
                mem_budget::Workload {
                    batch: work.batch,
                    seq: s,
                },
                &mem_budget::ActivationConfig::default(),
            );
            a.total <= room.activations.min(room.total)
        });
        let recommendation = if fits {
            "OK".to_string()
        } else {
            match max_tokens {
                Some(n) => format!("input too long for this machine: at most {n} tokens per text fit for {} texts", texts.len()),
                None => "memory is too short for any input now: free memory (emergency cleanup) or use the remote tier".to_string(),
            }
        };
        let headroom = room.activations.min(room.total) as i128 - act.total as i128;
        Ok(RequestEstimate {
            texts: texts.len(),
            tokens: total,
            longest,
            estimate: mem_budget::Estimate {
                bytes: act.total,
                breakdown: vec![
                    mem_budget::Part {
                        name: "attention scores".into(),
                        bytes: act.attention_scores,
                    },
                    mem_budget::Part {
                        name: "layer activations".into(),
                        bytes: act.layer_other,
                    },
                ],
                fits,
                headroom: headroom.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                max_tokens,
                recommendation,
            },
        })
    }
}

/// The local tier: the registry's model through its batcher.
pub(crate) struct LocalBackend {
    pub(crate) registry: Arc<Registry>,
    pub(crate) model: String,
    pub(crate) pool: buffer_pool::NamedPool,
}

impl tier_router::Backend<[String], Vec<Vec<f32>>> for LocalBackend {
    fn call(
        &self,
        texts: &[String],
        deadline: tier_router::Deadline,
    ) -> std::result::Result<Vec<Vec<f32>>, tier_router::BackendError> {
        use tier_router::BackendError;
        let loaded = self.registry.get(&self.model).map_err(|e| match e {
            Error::DoesNotFit { .. } => BackendError::permanent(e.to_string()),
            other => BackendError::permanent(other.to_string()),
        })?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens = loaded
            .model
            .tokenize(&refs)
            .map_err(|e| BackendError::permanent(e.to_string()))?;
        let dim = loaded.model.dim();
        // Scratch for the answers: bounded by the pool, so a flood of large
        // requests waits here instead of growing memory.
        let wait = deadline.remaining().unwrap_or(Duration::from_secs(30));
        let mut scratch = self
            .pool
            .acquire_f32_timeout(texts.len() * dim, wait)
            .map_err(|e| BackendError::transient(e.to_string()))?;
        let mut submit = batcher::Submit::default();
        if let Some(at) = deadline.instant() {
            submit = submit.deadline(at);
        }
        let mut tickets = Vec::with_capacity(tokens.len());
        for t in tokens {
            match loaded.batcher.submit_with(t, submit) {
                Ok(ticket) => tickets.push(ticket),
                // Dropping the tickets taken so far cancels them.
                Err(e) => return Err(BackendError::transient(e.to_string())),
            }
        }
        let out = scratch.as_mut_slice_f32();
        for (i, ticket) in tickets.into_iter().enumerate() {
            let v = ticket.wait().map_err(|e| match e {
                batcher::Error::TimedOut { .. } | batcher::Error::Overloaded { .. } => {
                    BackendError::transient(e.to_string())
                }
                other => BackendError::permanent(other.to_string()),
            })?;
            if v.len() != dim {
                return Err(BackendError::permanent(format!(
                    "model answered {} dims, expected {dim}",
                    v.len()
                )));
            }
            out[i * dim..(i + 1) * dim].copy_from_slice(&v);
        }
        Ok(out[..texts.len() * dim]
            .chunks(dim)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn is_loaded(&self) -> bool {
        self.registry.is_loaded_or_loading(&self.model)
    }
}
