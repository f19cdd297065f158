//! Reference models on candle and quant: all-MiniLM-L6-v2 sentence embeddings first.
//!
//! - [`MiniLm`]: the all-MiniLM-L6-v2 BERT sentence encoder (384 dims) with
//!   [`quant::QLinear`] layers, so f32, Q8_0 (INT8), Q4_K (INT4) and mixed
//!   per-tensor plans share one code path ([`LoadOptions`]). Batches run
//!   packed (no padding); [`MiniLm::tokenize`] and [`MiniLm::embed_tokens`]
//!   are separate so a batcher can tokenise ahead and weigh texts by tokens.
//! - [`RuleBasedEmbedder`]: feature hashing of words and character n-grams,
//!   the tier that never fails.
//! - [`Embed`]: what both offer.
//! - [`Tokenizer`]: the tokenizer of a GGUF decoder, read from its metadata
//!   (byte-level BPE and SentencePiece), matching llama.cpp's ids;
//!   [`ChatTemplate`] renders the model's chat template; [`Sampler`] and
//!   [`StopMatcher`] choose tokens and stop generation. [`gguf_path`] finds
//!   the GGUF files `scripts/fetch-model.sh` fetches.
//!
//! The model files come from `scripts/fetch-model.sh`; [`model_dir`] finds
//! them.
//!
//! ```
//! use models::{Embed, RuleBasedEmbedder};
//!
//! let e = RuleBasedEmbedder::default();
//! let v = e.embed(&["A cat sits on the mat", "a cat sat on a mat", "Stock prices fell"]).unwrap();
//! let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
//! assert_eq!(v[0].len(), 384);
//! assert!(cos(&v[0], &v[1]) > cos(&v[0], &v[2]));
//! ```
//!
//! With the model fetched (`scripts/fetch-model.sh`):
//!
//! ```no_run
//! use models::{LoadOptions, MiniLm};
//! use quant::Format;
//!
//! let model = MiniLm::load(models::model_dir()?, &LoadOptions::uniform(Format::Q8_0))?;
//! let v = model.embed(&["How is the weather today?", "What is the weather like?"])?;
//! assert_eq!(v[0].len(), 384);
//! # Ok::<(), models::Error>(())
//! ```

pub mod chat;
pub mod decoder;
mod error;
mod gguf_path;
mod int4_plan;
mod kernels;
mod minilm;
mod rule;
pub mod sampling;
pub mod tokenizer;

use std::path::{Path, PathBuf};

pub use crate::decoder::{Decoder, DecoderConfig, DecoderEstimate};
pub use crate::error::{Error, Result};
pub use crate::int4_plan::{
    minilm_int4_plan, minilm_sensitivities, INT4_PLAN_CANDIDATES, MINILM_INT4_PLAN_MIX,
};
pub use crate::minilm::{
    BertConfig, LoadOptions, MiniLm, MiniLmMemory, MiniLmTokenizer, Profile, Tokens,
    TOKENIZE_BYTES_PER_TEXT_BYTE, TOKENIZE_BYTES_PER_TOKEN,
};
pub use crate::rule::{RuleBasedConfig, RuleBasedEmbedder};

pub use crate::chat::{ChatTemplate, Message};
pub use crate::gguf_path::{gguf_path, DEFAULT_MODELS_ROOT, GGUF_MODELS};
pub use crate::sampling::{Sampler, SamplingConfig, StopMatcher, StopOutput};
pub use crate::tokenizer::{StreamDecoder, TokenType, Tokenizer, TokenizerModel};

/// A sentence embedder: texts in, one vector per text out.
pub trait Embed: Send + Sync {
    /// One vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;
    /// Length of each vector.
    fn dim(&self) -> usize;
}

/// Where `scripts/fetch-model.sh` puts the model, relative to the repository root.
pub const DEFAULT_MODEL_DIR: &str = "models/all-MiniLM-L6-v2";

/// The directory holding all-MiniLM-L6-v2: `SNUG_MODEL_DIR` when set
/// (absolute, or relative to the current directory or one of its ancestors,
/// like the repository root), else [`DEFAULT_MODEL_DIR`] under the current
/// directory or its nearest ancestor that has it. Errors, naming
/// `scripts/fetch-model.sh`, when no such directory holds `model.safetensors`.
pub fn model_dir() -> Result<PathBuf> {
    let wanted = std::env::var_os("SNUG_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR));
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    find_model_dir(&wanted, &cwd)
}

fn find_model_dir(wanted: &Path, from: &Path) -> Result<PathBuf> {
    if wanted.is_absolute() {
        let p = wanted.join("model.safetensors");
        return if p.is_file() {
            Ok(wanted.to_path_buf())
        } else {
            Err(Error::ModelMissing { path: p })
        };
    }
    for dir in from.ancestors() {
        let cand = dir.join(wanted);
        if cand.join("model.safetensors").is_file() {
            return Ok(cand);
        }
    }
    Err(Error::ModelMissing {
        path: from.join(wanted).join("model.safetensors"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_model_names_the_script() {
        let e = find_model_dir(Path::new("/nonexistent/dir"), Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("scripts/fetch-model.sh"), "{e}");
        let e = find_model_dir(Path::new("no/such/dir"), Path::new("/tmp")).unwrap_err();
        assert!(e.to_string().contains("no/such/dir"), "{e}");
    }
}
