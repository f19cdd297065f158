//! Serving embeddings: `embed`, `embed_with`, the pre-flight `estimate`,
//! and the local tier's backend.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
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

    /// Embeds texts with the embedding model registered as `model`: the
    /// default model goes through the cache and the tier chain as
    /// [`Runtime::embed`] does; any other registered embedding model serves
    /// through its own batcher; `rule-based` names the rule-based tier of a
    /// runtime without a local embedding model. An unknown name is an error
    /// listing the registered ones.
    pub fn embed_model(&self, model: &str, texts: &[&str]) -> Result<Embeddings> {
        let inner = &self.inner;
        let rule_based_only = inner.default_model.is_none() && model == crate::generate::RULE_BASED;
        if inner.default_model.as_deref() == Some(model) || rule_based_only {
            return self.embed(texts);
        }
        if !inner.registry.names().iter().any(|n| n == model) {
            return Err(self.unknown(model));
        }
        if texts.is_empty() {
            return Err(Error::InvalidInput(
                "no texts to embed: pass at least one".into(),
            ));
        }
        let loaded = self.name_errors(inner.registry.get(model))?;
        let tokens = loaded.model.tokenize(texts)?;
        let tickets = loaded
            .batcher
            .submit_all_with(tokens, batcher::Submit::default())
            .map_err(|e| Error::Backend(e.to_string()))?;
        let mut vectors = Vec::with_capacity(tickets.len());
        for t in tickets {
            vectors.push(t.wait().map_err(|e| Error::Backend(e.to_string()))?);
        }
        Ok(Embeddings {
            vectors,
            cache_hits: 0,
            tier: Some(tier_router::Tier::Small),
            backend: Some(model.to_string()),
            trail: Vec::new(),
        })
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
        self.check_input_tokens(texts)?;
        // 1. The cache, keyed by the model's version and the variant (the
        // format) loaded now: answers of one format are never served as
        // another's after a re-plan.
        let variant = model
            .as_deref()
            .and_then(|m| inner.registry.loaded_variant(m))
            .unwrap_or_default();
        let key = |variant: &str, t: &str| format!("{version}\u{1f}{variant}\u{1f}{t}");
        let mut out: Vec<Option<Vec<f32>>> = texts
            .iter()
            .map(|t| inner.cache.get(&key(&variant, t)).map(|v| v.to_vec()))
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
        SERVED_VARIANT.with(|v| v.borrow_mut().take());
        let started = std::time::Instant::now();
        let served = inner.router.serve(&features, &miss_texts[..], deadline)?;
        // What each text cost to compute: every later hit saves that much.
        let per_text = started.elapsed() / miss_texts.len().max(1) as u32;
        let served_variant = SERVED_VARIANT.with(|v| v.borrow_mut().take());
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
        let served_variant = served_variant.unwrap_or_default();
        for (&i, v) in misses.iter().zip(served.response) {
            if cacheable {
                if let Err(e) = inner.cache.insert_with(
                    key(&served_variant, texts[i]),
                    Arc::new(v.clone()),
                    feature_cache::EntryOptions::new().load_time(per_text),
                ) {
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

    /// The pre-flight answer for embedding `texts` in one request: the
    /// bytes it will add at its peak and whether they fit the memory left
    /// now, and if not, the longest input that does. Computed from the
    /// tokenizer and the model's memory facts ([`models::MiniLmMemory`]),
    /// without loading the model, for what the runtime really runs: the
    /// request split into batches of at most `batch_size` texts and the
    /// plan's batch tokens, one batch at a time, packed without padding.
    pub fn estimate(&self, texts: &[&str]) -> Result<RequestEstimate> {
        let inner = &self.inner;
        let Some(facts) = inner.facts.as_ref() else {
            return Err(Error::InvalidInput(
                "no local model with known memory facts is registered to estimate for".into(),
            ));
        };
        let counts = facts.count(texts)?;
        let window = facts.memory.max_tokens as u64;
        let lens: Vec<u64> = counts.iter().map(|&n| (n as u64).min(window)).collect();
        let total: u64 = lens.iter().sum();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let bytes_of = |lens: &[u64], text_bytes: u64, tokenizing: u64| {
            request_bytes(
                &facts.memory,
                lens,
                text_bytes,
                tokenizing,
                inner.plan.lock().batch_tokens,
                inner.config.batch.max_batch_size,
            )
        };
        let text_bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
        // Tokenizing works on whole texts: untruncated counts.
        let tokenizing = models::MiniLmTokenizer::transient_bytes(texts, &counts);
        let bytes = bytes_of(&lens, text_bytes, tokenizing);
        let room = mem_budget::Room::in_ledger(inner.registry.ledger())?;
        let free = room.activations.min(room.total);
        let fits = bytes <= free;
        let max_tokens = (1..=window).rev().find(|&s| {
            let capped: Vec<u64> = lens.iter().map(|&l| l.min(s)).collect();
            bytes_of(&capped, text_bytes, tokenizing) <= free
        });
        let recommendation = if fits {
            "OK".to_string()
        } else {
            match max_tokens {
                Some(n) => format!("input too long for this machine: at most {n} tokens per text fit for {} texts", texts.len()),
                None => "memory is too short for any input now: free memory (emergency cleanup) or use the remote tier".to_string(),
            }
        };
        let batch = largest_batch(
            &lens,
            inner.plan.lock().batch_tokens,
            inner.config.batch.max_batch_size,
        );
        let activations = facts.memory.batch_bytes(batch.0, batch.1);
        let headroom = free as i128 - bytes as i128;
        Ok(RequestEstimate {
            texts: texts.len(),
            tokens: total,
            longest,
            estimate: mem_budget::Estimate {
                bytes,
                breakdown: vec![
                    mem_budget::Part {
                        name: format!(
                            "activations of the largest batch ({} tokens, {} texts)",
                            batch.0, batch.1
                        ),
                        bytes: activations,
                    },
                    mem_budget::Part {
                        name: "tokens, texts and answers of the request".into(),
                        bytes: bytes - activations,
                    },
                ],
                fits,
                headroom: headroom.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                max_tokens,
                recommendation,
            },
        })
    }

    /// Refuses texts longer than the plan's `max_input_tokens` where that is
    /// below the model's window (memory, not the model, sets the limit);
    /// texts longer than the window are truncated by the model as documented.
    fn check_input_tokens(&self, texts: &[&str]) -> Result<()> {
        let inner = &self.inner;
        let Some(facts) = inner.facts.as_ref() else {
            return Ok(());
        };
        let limit = inner.plan.lock().max_input_tokens;
        // 0: no input fits the model now; the router's next tier answers.
        if limit == 0 || limit >= facts.memory.max_tokens as u64 {
            return Ok(());
        }
        // A WordPiece token covers at least one byte: only texts with more
        // bytes than the limit (less [CLS] and [SEP]) can be over it.
        let suspects: Vec<(usize, &str)> = texts
            .iter()
            .enumerate()
            .filter(|(_, t)| t.len() as u64 + 2 > limit)
            .map(|(i, t)| (i, *t))
            .collect();
        if suspects.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = suspects.iter().map(|(_, t)| *t).collect();
        let counts = facts.count(&refs)?;
        if let Some(((i, _), n)) = suspects.iter().zip(counts).find(|(_, n)| *n as u64 > limit) {
            return Err(Error::InvalidInput(format!(
                "text {i} is {n} tokens, over the limit of {limit} tokens that fit the memory free now; split it with runtime::chunk::Chunker or free memory"
            )));
        }
        Ok(())
    }
}

thread_local! {
    /// The variant the local tier served the last call on this thread with
    /// (the router calls backends on the caller's thread).
    static SERVED_VARIANT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
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
        SERVED_VARIANT.with(|v| *v.borrow_mut() = Some(loaded.variant.clone()));
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
        // All of the request's texts are queued at once, so they batch
        // together as the estimate assumes (not the first alone while the
        // rest are still being queued).
        let tickets = loaded
            .batcher
            .submit_all_with(tokens, submit)
            .map_err(|e| BackendError::transient(e.to_string()))?;
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

/// Tokens and texts of the largest batch `lens` make when packed in order
/// into batches of at most `batch_tokens` tokens and `batch_size` texts, as
/// the batcher forms them (a text longer than `batch_tokens` runs alone).
pub(crate) fn largest_batch(lens: &[u64], batch_tokens: u64, batch_size: usize) -> (u64, u64) {
    let (mut best, mut cur) = ((0u64, 0u64), (0u64, 0u64));
    for &l in lens {
        if cur.1 > 0 && (cur.0 + l > batch_tokens || cur.1 as usize >= batch_size.max(1)) {
            cur = (0, 0);
        }
        cur = (cur.0 + l, cur.1 + 1);
        if cur.0 > best.0 {
            best = cur;
        }
    }
    best
}

/// Bytes a request adds at its peak: the activations of its largest batch,
/// plus what the runtime holds for the whole request: each text's tokens
/// (ids and type ids, 8 bytes a token), the tokenizer's encodings of all of
/// them ([`ENCODING_BYTES_PER_TOKEN`]) and `tokenizing`, what the tokenizer
/// holds at once while it works
/// ([`models::MiniLmTokenizer::transient_bytes`]; both are freed before the
/// forward, but their heap pages stay resident beneath it), up to a page
/// more for each of the forward's buffers the allocator maps
/// ([`models::MiniLmMemory::buffers_at_peak`]), two copies of
/// the texts (the misses and the cache keys), and per text four copies of
/// its answer (the batcher's, the pooled scratch, the returned vector, the
/// cached one) with the cache's per-entry overhead.
pub(crate) fn request_bytes(
    memory: &models::MiniLmMemory,
    lens: &[u64],
    text_bytes: u64,
    tokenizing: u64,
    batch_tokens: u64,
    batch_size: usize,
) -> u64 {
    let (tokens, texts) = largest_batch(lens, batch_tokens, batch_size);
    let all_tokens: u64 = lens.iter().sum();
    let n = lens.len() as u64;
    memory.batch_bytes(tokens, texts)
        + (8 + ENCODING_BYTES_PER_TOKEN) * all_tokens
        + tokenizing
        + memory.buffers_at_peak() * mapped_chunk_slack()
        + 2 * text_bytes
        + n * (4 * memory.per_text + CACHE_ENTRY_BYTES)
}

/// The most a buffer can take beyond its size when the allocator maps it
/// (glibc, for chunks of at least the mmap threshold the runtime fixes):
/// whole pages, with a 16-byte chunk header.
fn mapped_chunk_slack() -> u64 {
    #[cfg(unix)]
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    #[cfg(not(unix))]
    let page = 4096;
    u64::try_from(page).unwrap_or(4096).max(4096) + 16
}

/// Heap bytes per token of a `tokenizers::Encoding`, at most: seven
/// vectors with a token's entry in each (ids 4, type ids 4, the token's
/// `String` 24, word 8, offsets 16, two masks 4 + 4: 64 bytes), at up to
/// twice their length as they grow, and the token's text in the smallest
/// heap chunk (32 bytes for up to 24 bytes of text).
pub(crate) const ENCODING_BYTES_PER_TOKEN: u64 = 2 * 64 + 32;

/// The cache's weigher charges this per entry beyond key and vector.
pub(crate) const CACHE_ENTRY_BYTES: u64 = 96;
