//! The model's shape, read from GGUF metadata and tensor infos.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The decoder families this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Architecture {
    /// Llama family (`general.architecture = llama`): RMSNorm, SiLU-gated
    /// MLP, RoPE on adjacent pairs, grouped-query attention.
    Llama,
    /// Gemma 3 (`gemma3`): embeddings scaled by `sqrt(hidden)`, q/k RMSNorm
    /// per head, post-attention and post-MLP norms, GELU-tanh MLP, NeoX RoPE,
    /// interleaved sliding-window (local) and global layers with their own
    /// RoPE bases.
    Gemma3,
}

impl Architecture {
    /// The names accepted in `general.architecture`.
    pub const SUPPORTED: &'static str = "llama, gemma3";

    /// Parses `general.architecture`.
    pub fn from_gguf_name(name: &str) -> Result<Architecture> {
        match name {
            "llama" => Ok(Architecture::Llama),
            "gemma3" => Ok(Architecture::Gemma3),
            other => Err(Error::UnknownArchitecture {
                arch: other.to_string(),
                supported: Self::SUPPORTED,
            }),
        }
    }

    /// The metadata prefix (`llama`, `gemma3`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Gemma3 => "gemma3",
        }
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Dimensions `(2i, 2i+1)` form a pair (llama.cpp's `NORM`; GGUF llama
    /// weights are permuted for it).
    Adjacent,
    /// Dimensions `(i, i + d/2)` form a pair (llama.cpp's `NEOX`).
    Halves,
}

/// What one layer looks like where layers differ (Gemma 3's local and global
/// layers).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerKind {
    /// Keys visible to a query at position `p`: those at `p - window < q <= p`;
    /// `None` for full causal attention.
    pub window: Option<usize>,
    /// RoPE base of this layer.
    pub rope_base: f32,
}

/// A decoder's shape, read from GGUF metadata and tensor infos.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The family.
    pub arch: Architecture,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP.
    pub ffn: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head (queries and keys).
    pub head_dim: usize,
    /// Dimension of one value head.
    pub value_dim: usize,
    /// Dimensions of a head that RoPE rotates (the first `rope_dims`).
    pub rope_dims: usize,
    /// RoPE pairing.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Context the model was trained for.
    pub context: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Scale applied to queries before `q·k`.
    pub attn_scale: f32,
    /// Scale applied to embeddings (`sqrt(hidden)` for Gemma, 1 otherwise).
    pub embed_scale: f32,
    /// Logit soft-capping (`cap * tanh(x / cap)`), when the model has one.
    pub final_softcap: Option<f32>,
    /// Per-layer window and RoPE base.
    pub layers: Vec<LayerKind>,
    /// The output projection is the token embedding (no `output.weight`).
    pub tied_output: bool,
    /// BOS token id, when the file names one.
    pub bos: Option<u32>,
    /// Whether the tokenizer adds BOS at the start of a text.
    pub add_bos: bool,
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| Error::BadMetadata {
        key: key.to_string(),
        reason: "missing".into(),
    })
}

fn as_usize(v: &Value, key: &str) -> Result<usize> {
    let n: Option<u64> = match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::BadMetadata {
            key: key.to_string(),
            reason: format!("expected a non-negative integer, found {v:?}"),
        })
}

fn as_f32(v: &Value, key: &str) -> Result<f32> {
    match v {
        Value::F32(x) => Ok(*x),
        Value::F64(x) => Ok(*x as f32),
        other => as_usize(other, key).map(|n| n as f32),
    }
}

fn usize_key(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    as_usize(get(md, key)?, key)
}

fn opt_usize(md: &HashMap<String, Value>, key: &str) -> Result<Option<usize>> {
    md.get(key).map(|v| as_usize(v, key)).transpose()
}

fn opt_f32(md: &HashMap<String, Value>, key: &str) -> Result<Option<f32>> {
    md.get(key).map(|v| as_f32(v, key)).transpose()
}

fn positive(key: &str, v: usize) -> Result<usize> {
    if v == 0 {
        Err(Error::BadMetadata {
            key: key.to_string(),
            reason: "must be positive, found 0".into(),
        })
    } else {
        Ok(v)
    }
}

impl ModelConfig {
    /// Reads the shape from a parsed GGUF header (no tensor data is read).
    pub fn from_gguf(content: &Content) -> Result<ModelConfig> {
        let md = &content.metadata;
        let arch_name = match get(md, "general.architecture")? {
            Value::String(s) => s.clone(),
            other => {
                return Err(Error::BadMetadata {
                    key: "general.architecture".into(),
                    reason: format!("expected a string, found {other:?}"),
                })
            }
        };
        let arch = Architecture::from_gguf_name(&arch_name)?;
        let p = arch.gguf_name();
        let k = |s: &str| format!("{p}.{s}");

        let n_layers = positive(&k("block_count"), usize_key(md, &k("block_count"))?)?;
        let hidden = positive(
            &k("embedding_length"),
            usize_key(md, &k("embedding_length"))?,
        )?;
        let ffn = positive(
            &k("feed_forward_length"),
            usize_key(md, &k("feed_forward_length"))?,
        )?;
        let n_heads = positive(
            &k("attention.head_count"),
            usize_key(md, &k("attention.head_count"))?,
        )?;
        let n_kv_heads = opt_usize(md, &k("attention.head_count_kv"))?.unwrap_or(n_heads);
        if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::BadMetadata {
                key: k("attention.head_count_kv"),
                reason: format!(
                    "{n_kv_heads} key/value heads do not divide the {n_heads} query heads"
                ),
            });
        }
        let head_dim = match opt_usize(md, &k("attention.key_length"))? {
            Some(d) => d,
            None => {
                if !hidden.is_multiple_of(n_heads) {
                    return Err(Error::BadMetadata {
                        key: k("attention.key_length"),
                        reason: format!(
                            "missing, and the width {hidden} is not a multiple of the {n_heads} heads"
                        ),
                    });
                }
                hidden / n_heads
            }
        };
        let head_dim = positive(&k("attention.key_length"), head_dim)?;
        let value_dim = opt_usize(md, &k("attention.value_length"))?.unwrap_or(head_dim);
        if value_dim != head_dim {
            return Err(Error::BadMetadata {
                key: k("attention.value_length"),
                reason: format!("{value_dim} differs from the key length {head_dim}; only equal lengths are supported"),
            });
        }
        let rope_dims = opt_usize(md, &k("rope.dimension_count"))?.unwrap_or(head_dim);
        if rope_dims == 0 || rope_dims > head_dim || !rope_dims.is_multiple_of(2) {
            return Err(Error::BadMetadata {
                key: k("rope.dimension_count"),
                reason: format!(
                    "{rope_dims} must be even and within the head dimension {head_dim}"
                ),
            });
        }
        if let Some(v) = md.get(&k("rope.scaling.type")) {
            let ok = matches!(v, Value::String(s) if s == "none");
            if !ok {
                return Err(Error::BadMetadata {
                    key: k("rope.scaling.type"),
                    reason: format!("{v:?}: RoPE scaling is not supported"),
                });
            }
        }
        let rope_base = opt_f32(md, &k("rope.freq_base"))?.unwrap_or(10_000.0);
        let rms_eps = as_f32(
            get(md, &k("attention.layer_norm_rms_epsilon"))?,
            &k("attention.layer_norm_rms_epsilon"),
        )?;
        let context = positive(&k("context_length"), usize_key(md, &k("context_length"))?)?;

        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::BadTensor {
                name: "token_embd.weight".into(),
                reason: "missing".into(),
            })?;
        let dims = embd.shape.dims();
        if dims.len() != 2 || dims[1] != hidden {
            return Err(Error::BadTensor {
                name: "token_embd.weight".into(),
                reason: format!("shape {dims:?}, expected [vocab, {hidden}]"),
            });
        }
        let vocab = positive("token_embd.weight rows", dims[0])?;
        let tied_output = !content.tensor_infos.contains_key("output.weight");

        let (layers, attn_scale, embed_scale, rope_style, final_softcap) = match arch {
            Architecture::Llama => (
                vec![
                    LayerKind {
                        window: None,
                        rope_base,
                    };
                    n_layers
                ],
                1.0 / (head_dim as f32).sqrt(),
                1.0,
                RopeStyle::Adjacent,
                None,
            ),
            Architecture::Gemma3 => {
                let window = opt_usize(md, &k("attention.sliding_window"))?.filter(|&w| w > 0);
                let pattern = opt_usize(md, &k("attention.sliding_window_pattern"))?.unwrap_or(6);
                let local_base = opt_f32(md, &k("rope.freq_base_swa"))?.unwrap_or(10_000.0);
                let layers = (0..n_layers)
                    .map(|il| {
                        // llama.cpp's set_swa_pattern: every `pattern`-th
                        // layer is global, the others slide.
                        let local =
                            window.is_some() && (pattern == 0 || il % pattern < pattern - 1);
                        if local {
                            LayerKind {
                                window,
                                rope_base: local_base,
                            }
                        } else {
                            LayerKind {
                                window: None,
                                rope_base,
                            }
                        }
                    })
                    .collect();
                let softcap = opt_f32(md, &k("final_logit_softcapping"))?.filter(|&c| c > 0.0);
                (
                    layers,
                    1.0 / (head_dim as f32).sqrt(),
                    (hidden as f32).sqrt(),
                    RopeStyle::Halves,
                    softcap,
                )
            }
        };

        let bos = opt_usize(md, "tokenizer.ggml.bos_token_id")?.and_then(|b| u32::try_from(b).ok());
        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            // llama.cpp's default: SentencePiece adds BOS, BPE does not.
            _ => matches!(md.get("tokenizer.ggml.model"), Some(Value::String(s)) if s == "llama"),
        };

        Ok(ModelConfig {
            arch,
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            value_dim,
            rope_dims,
            rope_style,
            rms_eps,
            context,
            vocab,
            attn_scale,
            embed_scale,
            final_softcap,
            layers,
            tied_output,
            bos: bos.filter(|&b| (b as usize) < vocab),
            add_bos,
        })
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The distinct layer kinds, each with the layers that have it, in order
    /// of first appearance (one group for llama, local and global for Gemma 3).
    pub fn layer_groups(&self) -> Vec<(LayerKind, Vec<usize>)> {
        let mut groups: Vec<(LayerKind, Vec<usize>)> = Vec::new();
        for (il, kind) in self.layers.iter().enumerate() {
            match groups.iter_mut().find(|(k, _)| k == kind) {
                Some((_, v)) => v.push(il),
                None => groups.push((*kind, vec![il])),
            }
        }
        groups
    }
}

/// The tensor types the decoder's matmuls accept.
pub(crate) fn check_matmul_dtype(name: &str, dtype: GgmlDType, in_dim: usize) -> Result<()> {
    let bs = dtype.block_size();
    if !in_dim.is_multiple_of(bs) {
        return Err(Error::BadTensor {
            name: name.to_string(),
            reason: format!(
                "input width {in_dim} is not a multiple of the {dtype:?} block of {bs}"
            ),
        });
    }
    Ok(())
}
