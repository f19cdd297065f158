//! What the runtime serves: embedding models, registered with their variants
//! and loaders.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// What a MiniLM variant will need, estimated from the safetensors header
/// and `config.json` alone (no tensor data is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MiniLmEstimate {
    /// Weights once forwards have run: quantized linear weights (input
    /// dimension padded as the model pads it) with candle's repacked copies,
    /// and the f32 embeddings, biases and norms.
    pub weights: u64,
    /// Peak bytes while loading: the memory-mapped file's pages, the
    /// weights built, and the f32 copy of the one linear weight being
    /// quantized.
    pub load_peak: u64,
    /// Activations of the largest batch of `batch_tokens` tokens (the
    /// encoder packs a batch without padding and attends one text at a
    /// time, so they grow linearly with the tokens).
    pub activations: u64,
    /// The tokenizer and the runtime's own structures (a measured constant,
    /// [`MINILM_OVERHEAD`]).
    pub overhead: u64,
    /// What to reserve: `max(load_peak, weights + activations) + overhead`.
    pub total: u64,
}

/// Bytes the MiniLM tokenizer and per-model runtime structures take beyond
/// weights and activations: measured on the project's machine as resident
/// growth after load less the weights (9.6–11.0 MiB for f32, Q8_0 and Q4_K;
/// `cargo run --release --example e2e_bench`), rounded up.
pub const MINILM_OVERHEAD: u64 = 12 << 20;

/// Is `name` a linear layer's weight in a BERT safetensors file?
fn is_linear_weight(name: &str, shape: &[u64]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && name.contains("encoder.layer.")
        && !name.contains("LayerNorm")
}

/// Estimates a MiniLM variant in `format` with batches of up to
/// `batch_tokens` tokens, from the model directory's headers.
pub fn minilm_estimate(
    dir: &Path,
    format: quant::Format,
    batch_tokens: u64,
) -> Result<MiniLmEstimate> {
    let path = dir.join("model.safetensors");
    let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let info = mem_budget::estimate_weights(&path)?;
    let config_path = dir.join("config.json");
    let config = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::InvalidConfig(format!("cannot read {}: {e}", config_path.display())))?;
    let shape = mem_budget::TransformerShape::from_hf_config(&config)?;
    let quantized = format != quant::Format::F32;
    // The model pads the hidden width up to a multiple of 256 where the
    // format gains from it: block formats, except Q8_0 when quant's int8
    // kernel serves it (see `models::LoadOptions::pad_inputs`).
    let padded = match format {
        quant::Format::F32 | quant::Format::F16 => false,
        quant::Format::Q8_0 => !quant::int8_kernel_available(),
        _ => true,
    };
    let (mut weights, mut largest_linear_f32) = (0u64, 0u64);
    for t in &info.tensors {
        let f32_bytes = t.elements() * 4;
        if is_linear_weight(&t.name, &t.shape) {
            largest_linear_f32 = largest_linear_f32.max(f32_bytes);
            let (out, inp) = (t.shape[0] as usize, t.shape[1] as usize);
            let inp = if padded { inp.div_ceil(256) * 256 } else { inp };
            weights += quant::resident_weight_bytes(format.fit(inp), out, inp);
        } else {
            weights += f32_bytes;
        }
    }
    // The encoder runs a batch packed as one [tokens, width] matrix and
    // attention one text at a time, so activations grow linearly with the
    // batch's tokens: the fused QKV (3H), the FFN's intermediate (I) and
    // about four hidden-width buffers (input, attention output, residual,
    // layer output; width padded like the weights), plus a quarter for the
    // allocator's slack.
    let padded_hidden = if padded {
        shape.hidden.div_ceil(256) * 256
    } else {
        shape.hidden
    };
    let per_token = 4 * (3 * shape.hidden + shape.intermediate + 4 * padded_hidden);
    let activations = batch_tokens.max(1) * per_token * 5 / 4;
    // Loading maps the file (its pages count as resident while read) and
    // builds the weights; a quantized linear weight passes through one f32
    // copy at a time.
    let load_peak = file_bytes + weights + if quantized { largest_linear_f32 } else { 0 };
    let total = load_peak.max(weights + activations) + MINILM_OVERHEAD;
    Ok(MiniLmEstimate {
        weights,
        load_peak,
        activations,
        overhead: MINILM_OVERHEAD,
        total,
    })
}

impl MiniLmVariants {
    /// The registration of all-MiniLM-L6-v2 under `name`.
    pub fn spec(&self, name: &str) -> Result<ModelSpec> {
        if self.formats.is_empty() {
            return Err(Error::InvalidConfig(
                "MiniLM needs at least one format to offer".into(),
            ));
        }
        let mut variants = Vec::new();
        for &format in &self.formats {
            let estimate = minilm_estimate(&self.dir, format, self.batch_tokens)?.total;
            let dir = self.dir.clone();
            variants.push(Variant::new(format.to_string(), estimate, move |ctx| {
                if format != quant::Format::F32 {
                    ctx.quantizing();
                }
                let options = models::LoadOptions::uniform(format);
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
