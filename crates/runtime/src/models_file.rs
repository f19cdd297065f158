//! The models a runtime serves, from a file: `snug.json` (or any JSON file
//! given to [`RuntimeBuilder::models_file`](crate::RuntimeBuilder::models_file)).
//!
//! ```json
//! {
//!   "embedding": [{ "name": "minilm", "dir": "models/all-MiniLM-L6-v2" }],
//!   "generative": [
//!     { "name": "smollm2-135m", "gguf": "models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf", "tier": "Small" },
//!     { "name": "gemma3-270m", "gguf": "models/gemma3-270m/gemma-3-270m-q4_k_m.gguf", "tier": "Medium" }
//!   ]
//! }
//! ```
//!
//! Relative paths are read from the file's own directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::decoder::GenerativeSpec;
use crate::error::{Error, Result};

/// An embedding model of a [`ModelsFile`]: an all-MiniLM-L6-v2-shaped
/// directory (`model.safetensors`, `tokenizer.json`, `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingEntry {
    /// The name requests use.
    pub name: String,
    /// The model's directory.
    pub dir: PathBuf,
}

/// The models to serve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsFile {
    /// Embedding models; the first is the default of `embed`.
    pub embedding: Vec<EmbeddingEntry>,
    /// Generative models.
    pub generative: Vec<GenerativeSpec>,
}

impl ModelsFile {
    /// Reads `path`; relative model paths are resolved against its directory.
    pub fn read(path: &Path) -> Result<ModelsFile> {
        let wrap = |source: Box<dyn std::error::Error + Send + Sync>| Error::ModelsFile {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(|e| wrap(Box::new(e)))?;
        let mut file: ModelsFile = serde_json::from_str(&text).map_err(|e| wrap(Box::new(e)))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for e in &mut file.embedding {
            if e.dir.is_relative() {
                e.dir = base.join(&e.dir);
            }
        }
        for g in &mut file.generative {
            if g.gguf.is_relative() {
                g.gguf = base.join(&g.gguf);
            }
        }
        Ok(file)
    }
}
