//! What the runtime serves: embedding models, registered with their variants
//! and loaders.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use models::Tokens;

/// A local sentence-embedding model the runtime can batch: tokenising and
/// the forward pass are separate, so requests are weighed by tokens before
/// they are batched.
pub trait EmbeddingModel: Send + Sync + fmt::Debug {
    /// Tokenises texts (with special tokens, truncated to the model's limit).
    fn tokenize(&self, texts: &[&str]) -> models::Result<Vec<Tokens>>;
    /// One unit vector per tokenised text, computed as one batch.
    fn embed_tokens(&self, batch: &[Tokens]) -> models::Result<Vec<Vec<f32>>>;
    /// Length of each vector.
    fn dim(&self) -> usize;
    /// Longest input in tokens.
    fn max_tokens(&self) -> usize;
    /// Bytes the weights occupy once forwards have run.
    fn resident_bytes(&self) -> u64;
}

impl EmbeddingModel for models::MiniLm {
    fn tokenize(&self, texts: &[&str]) -> models::Result<Vec<Tokens>> {
        models::MiniLm::tokenize(self, texts)
    }
    fn embed_tokens(&self, batch: &[Tokens]) -> models::Result<Vec<Vec<f32>>> {
        models::MiniLm::embed_tokens(self, batch)
    }
    fn dim(&self) -> usize {
        models::MiniLm::dim(self)
    }
    fn max_tokens(&self) -> usize {
        models::MiniLm::max_tokens(self)
    }
    fn resident_bytes(&self) -> u64 {
        models::MiniLm::resident_bytes(self)
    }
}

/// A stage of loading a model, reported to load listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "stage")]
#[non_exhaustive]
pub enum LoadEvent {
    /// The estimate fitted; bytes are reserved and the files are being read.
    Reading {
        /// Model name.
        model: String,
        /// The variant chosen.
        variant: String,
        /// Bytes reserved in the ledger.
        reserved: u64,
    },
    /// Weights are being converted to the variant's formats.
    Quantizing {
        /// Model name.
        model: String,
    },
    /// A first forward pass runs (candle builds its repacked weights).
    Warming {
        /// Model name.
        model: String,
    },
    /// The model serves requests.
    Ready {
        /// Model name.
        model: String,
        /// Bytes the weights occupy (measured by the model).
        resident: u64,
        /// Milliseconds the load took.
        millis: u64,
    },
    /// The model was unloaded and its reservation released.
    Unloaded {
        /// Model name.
        model: String,
        /// Why: `idle`, `emergency`, `evicted for <name>`, `shutdown`.
        reason: String,
    },
    /// No variant fitted, or the loader failed.
    Failed {
        /// Model name.
        model: String,
        /// The error, as text.
        error: String,
    },
}

/// Hands loaders a way to report progress.
pub struct LoadContext<'a> {
    pub(crate) model: &'a str,
    pub(crate) emit: &'a dyn Fn(LoadEvent),
}

impl fmt::Debug for LoadContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadContext")
            .field("model", &self.model)
            .finish()
    }
}

impl LoadContext<'_> {
    /// Reports that weights are being quantized.
    pub fn quantizing(&self) {
        (self.emit)(LoadEvent::Quantizing {
            model: self.model.to_string(),
        });
    }
}

type Loader = Arc<dyn Fn(&LoadContext<'_>) -> Result<Arc<dyn EmbeddingModel>> + Send + Sync>;

/// One way to load a model: a label, the bytes it will need (estimated
/// before loading, from file headers), and the loader.
#[derive(Clone)]
pub struct Variant {
    /// What this variant is, e.g. `q8_0` or `f32`.
    pub label: String,
    /// Bytes the loaded model will need: resident weights (with candle's
    /// repacked copies) and activations of the largest batch.
    pub estimate: u64,
    loader: Loader,
}

impl fmt::Debug for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Variant")
            .field("label", &self.label)
            .field("estimate", &self.estimate)
            .finish_non_exhaustive()
    }
}

impl Variant {
    /// A variant with its estimate and loader.
    pub fn new(
        label: impl Into<String>,
        estimate: u64,
        loader: impl Fn(&LoadContext<'_>) -> Result<Arc<dyn EmbeddingModel>> + Send + Sync + 'static,
    ) -> Self {
        Variant {
            label: label.into(),
            estimate,
            loader: Arc::new(loader),
        }
    }

    pub(crate) fn load(&self, ctx: &LoadContext<'_>) -> Result<Arc<dyn EmbeddingModel>> {
        (self.loader)(ctx)
    }
}

/// A model under a name: its version (part of every cache key) and its
/// variants, best first. A load takes the first variant whose estimate fits
/// the budget.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The name requests use.
    pub name: String,
    /// The version: cached results of another version are never returned.
    pub version: String,
    /// Variants, best first.
    pub variants: Vec<Variant>,
}

/// How the bundled all-MiniLM-L6-v2 is offered: which weight formats, best
/// first, and the activation budget each estimate includes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MiniLmVariants {
    /// Directory with `model.safetensors`, `tokenizer.json`, `config.json`.
    pub dir: PathBuf,
    /// Formats to offer, best first.
    pub formats: Vec<quant::Format>,
    /// Tokens in the largest batch (for the activation estimate).
    pub batch_tokens: u64,
}

/// What a MiniLM variant will need, estimated from `config.json`, the size
/// of `model.safetensors` and the tokenizer (no tensor data is read); the
/// terms come from [`models::MiniLm::memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MiniLmEstimate {
    /// Weights once forwards have run: linear weights (input dimension
    /// padded as the model pads it) with their repacked copies, the word
    /// table (Q8_0 rows when quantized) and the f32 tables, biases and norms.
    pub weights: u64,
    /// Peak bytes while loading: the memory-mapped file's pages, the
    /// weights built, and the f32 copies in flight.
    pub load_peak: u64,
    /// Activations of the largest batch of `batch_tokens` tokens (the
    /// encoder packs a batch without padding and attends one text at a
    /// time, so they grow linearly with the tokens).
    pub activations: u64,
    /// The model's tokenizer, as measured when it was loaded in this
    /// process ([`tokenizer_bytes`]).
    pub overhead: u64,
    /// What to reserve: `max(load_peak, weights + activations) + overhead`.
    pub total: u64,
}

/// Resident bytes the MiniLM tokenizer in `dir` takes: the growth of this
/// process's resident memory while one is loaded, measured once per process
/// and directory (the calibration the estimates use for the one part whose
/// size the code does not set: the tokenizer's vocabulary tables), rounded
/// up to whole MiB. Where resident memory cannot be read, four times the
/// size of `tokenizer.json`.
pub fn tokenizer_bytes(dir: &Path) -> Result<u64> {
    static MEASURED: std::sync::OnceLock<Mutex<std::collections::HashMap<PathBuf, u64>>> =
        std::sync::OnceLock::new();
    let cache = MEASURED.get_or_init(Default::default);
    // Measured under the lock: two threads asking at once must get the same
    // figure (a second measurement would differ and overwrite the first,
    // so estimates made before and after it would disagree).
    let mut cache = cache.lock();
    if let Some(&b) = cache.get(dir) {
        return Ok(b);
    }
    let file = std::fs::metadata(dir.join("tokenizer.json"))
        .map(|m| m.len())
        .unwrap_or(0);
    crate::cleanup::release_to_os();
    let before = crate::runtime::rss();
    let tokenizer = models::MiniLmTokenizer::load(dir, None)?;
    let after = crate::runtime::rss();
    drop(tokenizer);
    let grown = after.saturating_sub(before);
    let bytes = if before == 0 {
        4 * file
    } else {
        grown.max(file)
    };
    let bytes = bytes.div_ceil(1 << 20) << 20;
    cache.insert(dir.to_path_buf(), bytes);
    Ok(bytes)
}

/// How far the INT4 plan may go from the uniform Q4_K size towards the
/// uniform Q8_0 size of MiniLM's linear weights
/// ([`models::MINILM_INT4_PLAN_MIX`], where the procedure that chose it is
/// described).
pub const INT4_PLAN_MIX: f64 = models::MINILM_INT4_PLAN_MIX;

/// The load options the runtime uses for MiniLM in `format`: every linear
/// weight in `format`, except Q4_K, which is the *layer-wise INT4 plan*:
/// quant's planner keeps the weights Q4_K hurts most in Q6_K or Q8_0
/// ([`INT4_PLAN_MIX`]). The plan is calibrated once per model file (a few
/// seconds, one weight in f32 at a time) and kept in memory and in
/// `$SNUG_CACHE_DIR` (default `$XDG_CACHE_HOME/snug`, else `~/.cache/snug`)
/// under `plans/`, keyed by the file's size and modification time; where the
/// cache cannot be written, it is calibrated again in the next process.
pub fn minilm_options(dir: &Path, format: quant::Format) -> Result<models::LoadOptions> {
    if format != quant::Format::Q4_K {
        return Ok(models::LoadOptions::uniform(format));
    }
    type Plans = Mutex<std::collections::HashMap<PathBuf, models::LoadOptions>>;
    static PLANS: std::sync::OnceLock<Plans> = std::sync::OnceLock::new();
    let plans = PLANS.get_or_init(Default::default);
    let mut plans = plans.lock();
    if let Some(o) = plans.get(dir) {
        return Ok(o.clone());
    }
    let weights = dir.join("model.safetensors");
    let meta = std::fs::metadata(&weights).map_err(|e| {
        Error::InvalidInput(format!("cannot read {}: {e}", weights.display()))
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let file = cache_dir().map(|d| {
        d.join("plans").join(format!(
            "minilm-int4-{}-{mtime}-{INT4_PLAN_MIX}.json",
            meta.len()
        ))
    });
    let cached = file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| serde_json::from_slice::<std::collections::BTreeMap<String, quant::Format>>(&b).ok());
    let options = match cached {
        Some(plan) => models::LoadOptions {
            plan,
            ..models::LoadOptions::uniform(quant::Format::Q4_K)
        },
        None => {
            let started = std::time::Instant::now();
            let sens = models::minilm_sensitivities(dir)?;
            let options = models::minilm_int4_plan(&sens, INT4_PLAN_MIX)?;
            tracing::info!(dir = %dir.display(), millis = started.elapsed().as_millis() as u64, "INT4 plan calibrated");
            if let Some(f) = &file {
                if let Err(e) = write_atomically(f, &serde_json::to_vec(&options.plan).unwrap_or_default()) {
                    tracing::debug!(error = %e, path = %f.display(), "INT4 plan not cached");
                }
            }
            options
        }
    };
    plans.insert(dir.to_path_buf(), options.clone());
    Ok(options)
}

/// `$SNUG_CACHE_DIR`, else `$XDG_CACHE_HOME/snug`, else `~/.cache/snug`.
fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("SNUG_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("snug")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("snug")))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("plan"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Estimates a MiniLM variant in `format` with batches of up to
/// `batch_tokens` tokens, from the model directory's headers (and, for
/// Q4_K, the INT4 plan: [`minilm_options`]).
pub fn minilm_estimate(
    dir: &Path,
    format: quant::Format,
    batch_tokens: u64,
) -> Result<MiniLmEstimate> {
    let memory = models::MiniLm::memory(dir, &minilm_options(dir, format)?)?;
    let activations = memory.batch_bytes(batch_tokens.max(1), 1);
    let overhead = tokenizer_bytes(dir)?;
    let total = memory.load_peak.max(memory.weights + activations) + overhead;
    Ok(MiniLmEstimate {
        weights: memory.weights,
        load_peak: memory.load_peak,
        activations,
        overhead,
        total,
    })
}

/// What the runtime knows of its MiniLM without loading it: the memory
/// facts (the largest per-token need of the formats it may load) and, once
/// first asked, a tokenizer that counts tokens without truncating.
#[derive(Debug)]
pub(crate) struct MiniLmFacts {
    pub(crate) dir: PathBuf,
    pub(crate) memory: models::MiniLmMemory,
    tokenizer: std::sync::OnceLock<models::MiniLmTokenizer>,
}

impl MiniLmFacts {
    /// Facts for the model in `dir` loaded in any of `formats`: the
    /// activation terms of the widest stride among them, and the weights of
    /// the first (the one tried first).
    pub(crate) fn new(dir: PathBuf, formats: &[quant::Format]) -> Result<Self> {
        let mut memory: Option<models::MiniLmMemory> = None;
        for &f in formats {
            let m = models::MiniLm::memory(&dir, &minilm_options(&dir, f)?)?;
            memory = Some(match memory {
                None => m,
                Some(first) => {
                    // Any format may serve a batch: each activation term is
                    // the largest among them.
                    let wider = m.per_token > first.per_token;
                    models::MiniLmMemory {
                        per_token: first.per_token.max(m.per_token),
                        stride: if wider { m.stride } else { first.stride },
                        per_chunk_token: first.per_chunk_token.max(m.per_chunk_token),
                        per_chunk_block: first.per_chunk_block.max(m.per_chunk_block),
                        per_chunk_call: first.per_chunk_call.max(m.per_chunk_call),
                        chunk_rows: first.chunk_rows.max(m.chunk_rows),
                        ..first
                    }
                }
            });
        }
        let memory = memory.ok_or_else(|| {
            Error::invalid("formats", "[]", "at least one format to offer MiniLM in")
        })?;
        Ok(MiniLmFacts {
            dir,
            memory,
            tokenizer: std::sync::OnceLock::new(),
        })
    }

    /// Tokens of each text, untruncated.
    pub(crate) fn count(&self, texts: &[&str]) -> Result<Vec<usize>> {
        let t = match self.tokenizer.get() {
            Some(t) => t,
            None => {
                let t = models::MiniLmTokenizer::load(&self.dir, None)?;
                self.tokenizer.get_or_init(|| t)
            }
        };
        Ok(t.count(texts)?)
    }
}

/// The label of the runtime's MiniLM variant in `format`: the format's
/// name, or `int4-plan` for Q4_K ([`minilm_options`]).
pub fn variant_label(format: quant::Format) -> String {
    match format {
        quant::Format::Q4_K => "int4-plan".to_string(),
        f => f.to_string(),
    }
}

impl MiniLmVariants {
    /// The registration of all-MiniLM-L6-v2 under `name`.
    pub fn spec(&self, name: &str) -> Result<ModelSpec> {
        if self.formats.is_empty() {
            return Err(Error::invalid(
                "formats",
                "[]",
                "at least one format to offer MiniLM in",
            ));
        }
        let mut variants = Vec::new();
        for &format in &self.formats {
            let estimate = minilm_estimate(&self.dir, format, self.batch_tokens)?.total;
            let dir = self.dir.clone();
            let options = minilm_options(&dir, format)?;
            variants.push(Variant::new(variant_label(format), estimate, move |ctx| {
                if format != quant::Format::F32 {
                    ctx.quantizing();
                }
                let model = models::MiniLm::load(&dir, &options)?;
                Ok(Arc::new(model) as Arc<dyn EmbeddingModel>)
            }));
        }
        Ok(ModelSpec {
            name: name.to_string(),
            version: "all-MiniLM-L6-v2@1".to_string(),
            variants,
        })
    }
}
