//! Activation memory of encoder and decoder transformers, and the runtime's
//! extra copies of quantized weights.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::repack::RepackRules;
use crate::weights::WeightsInfo;

/// Encoder (BERT-like: whole input at once, no cache) or decoder
/// (GPT/Llama-like: keeps a KV cache, produces logits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformerKind {
    /// Bidirectional encoder.
    Encoder,
    /// Causal decoder with a KV cache.
    Decoder,
}

/// The sizes of a transformer that activations depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformerShape {
    /// Encoder or decoder.
    pub architecture: TransformerKind,
    /// Hidden size (`d_model`).
    pub hidden: u64,
    /// Number of layers.
    pub layers: u64,
    /// Attention heads.
    pub heads: u64,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: u64,
    /// Feed-forward inner size.
    pub intermediate: u64,
    /// Vocabulary size (decoder logits).
    pub vocab: u64,
}

impl TransformerShape {
    /// Reads a Hugging Face `config.json` (`hidden_size`,
    /// `num_hidden_layers`, `num_attention_heads`, `intermediate_size`,
    /// optional `num_key_value_heads`, `vocab_size`). Models whose
    /// `architectures` or `model_type` name a causal LM are decoders.
    pub fn from_hf_config(json: &str) -> Result<TransformerShape> {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| {
            Error::invalid(
                "config.json",
                e,
                "a Hugging Face model configuration (JSON object)",
            )
        })?;
        let num = |key: &'static str| -> Result<u64> {
            v.get(key)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| {
                    Error::invalid(
                        "config.json",
                        format!("no unsigned integer {key:?}"),
                        "hidden_size, num_hidden_layers, num_attention_heads and intermediate_size",
                    )
                })
        };
        let heads = num("num_attention_heads")?;
        let text = |key: &str| {
            v.get(key)
                .map(|x| x.to_string().to_ascii_lowercase())
                .unwrap_or_default()
        };
        let decoder = text("architectures").contains("causallm")
            || v.get("is_decoder").and_then(serde_json::Value::as_bool) == Some(true)
            || ["llama", "mistral", "qwen", "gemma", "phi", "gpt"]
                .iter()
                .any(|m| text("model_type").contains(m));
        let shape = TransformerShape {
            architecture: if decoder {
                TransformerKind::Decoder
            } else {
                TransformerKind::Encoder
            },
            hidden: num("hidden_size")?,
            layers: num("num_hidden_layers")?,
            heads,
            kv_heads: v
                .get("num_key_value_heads")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(heads),
            intermediate: num("intermediate_size")?,
            vocab: v
                .get("vocab_size")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
        };
        shape.validate()?;
        Ok(shape)
    }

    /// Reads the shape from a GGUF header's metadata
    /// (`{arch}.embedding_length`, `.block_count`, `.attention.head_count`,
    /// `.attention.head_count_kv`, `.feed_forward_length`, the tokenizer's
    /// vocabulary length). `None` where a key is missing. BERT-family
    /// architectures are encoders, the rest decoders.
    pub fn from_gguf(info: &WeightsInfo) -> Option<TransformerShape> {
        let arch = info.metadata.get("general.architecture")?.as_str()?;
        let get = |k: &str| {
            info.metadata
                .get(&format!("{arch}.{k}"))
                .and_then(|v| v.as_u64())
        };
        let heads = get("attention.head_count")?;
        let vocab = match info.metadata.get("tokenizer.ggml.tokens") {
            Some(crate::weights::MetaValue::Array { len, .. }) => *len,
            _ => get("vocab_size").unwrap_or(0),
        };
        let encoder = matches!(arch, "bert" | "nomic-bert" | "jina-bert-v2" | "t5encoder");
        let shape = TransformerShape {
            architecture: if encoder {
                TransformerKind::Encoder
            } else {
                TransformerKind::Decoder
            },
            hidden: get("embedding_length")?,
            layers: get("block_count")?,
            heads,
            kv_heads: get("attention.head_count_kv").unwrap_or(heads),
            intermediate: get("feed_forward_length")?,
            vocab,
        };
        shape.validate().ok().map(|()| shape)
    }

    fn validate(&self) -> Result<()> {
        if self.heads == 0
            || self.kv_heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || self.layers == 0
        {
            return Err(Error::invalid(
                "transformer shape",
                format!("{self:?}"),
                "non-zero layers and heads, hidden size a multiple of the head count",
            ));
        }
        Ok(())
    }

    fn head_dim(&self) -> u64 {
        self.hidden / self.heads.max(1)
    }
}

/// How activations are sized.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ActivationConfig {
    /// Bytes per activation element. Default 4 (f32; candle's quantized
    /// matmuls take and return f32).
    pub element_bytes: u64,
    /// Bytes per KV-cache element. Default 4.
    pub kv_element_bytes: u64,
    /// Multiplier on activations for the runtime's temporaries (contiguous
    /// copies, broadcast masks) and allocator slack. Default 1.5 for candle
    /// on CPU; checked against measured peak RSS by the runtime.
    pub runtime_overhead: f64,
    /// Which repacked copies of quantized weights candle keeps after the
    /// first forward. Default: this CPU's ([`RepackRules::this_cpu`]).
    pub repack: RepackRules,
}

impl Default for ActivationConfig {
    fn default() -> Self {
        ActivationConfig {
            element_bytes: 4,
            kv_element_bytes: 4,
            runtime_overhead: 1.5,
            repack: RepackRules::this_cpu(),
        }
    }
}

/// The size of one forward pass: batch size and sequence length (for a
/// decoder, the whole context: prompt plus generated tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Sequences per batch.
    pub batch: u64,
    /// Tokens per sequence.
    pub seq: u64,
}

/// Activation bytes of one forward pass, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activations {
    /// Attention scores and their softmax: `2 * batch * heads * seq^2`
    /// elements (the part that grows with the square of the input).
    pub attention_scores: u64,
    /// Everything else live in the busiest layer (residual stream, Q/K/V,
    /// context, feed-forward inner activations).
    pub layer_other: u64,
    /// Decoder KV cache: `2 * layers * batch * seq * kv_heads * head_dim`
    /// elements, plus one layer's transient copy while it is appended.
    pub kv_cache: u64,
    /// Decoder logits of the last position: `batch * vocab` elements.
    pub logits: u64,
    /// The total: `(attention_scores + layer_other + logits) *
    /// runtime_overhead + kv_cache`.
    pub total: u64,
}

impl Activations {
    /// Sizes one forward pass of `shape` on `work` under `config`.
    ///
    /// The busiest layer holds the residual stream and its normalised copy
    /// (`2·b·s·h`) plus the larger of the attention phase (Q, K, V, scores,
    /// softmax, context) and the feed-forward phase (`2·b·s·I` for an
    /// encoder, `3·b·s·I` for a gated decoder MLP). Layers run one after
    /// another, so only one layer's temporaries are live at once.
    pub fn estimate(
        shape: &TransformerShape,
        work: Workload,
        config: &ActivationConfig,
    ) -> Activations {
        // u128 with saturating steps: absurd inputs give u64::MAX, never a wrap.
        let m = |xs: &[u128]| xs.iter().fold(1u128, |a, &x| a.saturating_mul(x));
        let (b, s) = (work.batch as u128, work.seq as u128);
        let h = shape.hidden as u128;
        let kv_dim = (shape.kv_heads as u128).saturating_mul(shape.head_dim() as u128);
        let e = config.element_bytes as u128;
        let scores = m(&[2, b, shape.heads as u128, s, s]);
        let attention_rest = m(&[b, s, h.saturating_add(2 * kv_dim)]).saturating_add(m(&[b, s, h]));
        let gated = if shape.architecture == TransformerKind::Decoder {
            3
        } else {
            2
        };
        let mlp = m(&[b, s, shape.intermediate as u128, gated]);
        let residual = m(&[2, b, s, h]);
        let (attn_phase, other) = if scores.saturating_add(attention_rest) >= mlp {
            (scores, residual.saturating_add(attention_rest))
        } else {
            (0, residual.saturating_add(mlp))
        };
        let (kv, logits) = match shape.architecture {
            TransformerKind::Decoder => {
                let per_layer = m(&[2, b, s, kv_dim, config.kv_element_bytes as u128]);
                (
                    m(&[per_layer, shape.layers as u128 + 1]),
                    m(&[b, shape.vocab as u128, e]),
                )
            }
            TransformerKind::Encoder => (0, 0),
        };
        let clamp = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
        let scores_b = clamp(m(&[attn_phase, e]));
        let other_b = clamp(m(&[other, e]));
        let logits_b = clamp(logits);
        let kv_b = clamp(kv);
        let scaled =
            (scores_b as f64 + other_b as f64 + logits_b as f64) * config.runtime_overhead.max(1.0);
        Activations {
            attention_scores: scores_b,
            layer_other: other_b,
            kv_cache: kv_b,
            logits: logits_b,
            total: (scaled as u64).saturating_add(kv_b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> TransformerShape {
        TransformerShape::from_hf_config(
            r#"{"architectures": ["BertModel"], "hidden_size": 384, "num_hidden_layers": 6,
                "num_attention_heads": 12, "intermediate_size": 1536, "vocab_size": 30522}"#,
        )
        .unwrap()
    }

    #[test]
    fn hf_config_encoder_and_decoder() {
        let m = minilm();
        assert_eq!(m.architecture, TransformerKind::Encoder);
        assert_eq!((m.hidden, m.layers, m.heads, m.kv_heads), (384, 6, 12, 12));
        let llama = TransformerShape::from_hf_config(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 22,
                "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000}"#,
        )
        .unwrap();
        assert_eq!(llama.architecture, TransformerKind::Decoder);
        assert_eq!(llama.kv_heads, 4);
        assert!(TransformerShape::from_hf_config("{}").is_err());
        assert!(TransformerShape::from_hf_config(
            r#"{"hidden_size": 10, "num_hidden_layers": 1, "num_attention_heads": 3, "intermediate_size": 4}"#
        )
        .is_err());
    }

    #[test]
    fn attention_grows_with_the_square_of_the_sequence() {
        let m = minilm();
        let c = ActivationConfig::default();
        let a = Activations::estimate(&m, Workload { batch: 1, seq: 512 }, &c);
        let b = Activations::estimate(
            &m,
            Workload {
                batch: 1,
                seq: 1024,
            },
            &c,
        );
        assert_eq!(b.attention_scores, 4 * a.attention_scores);
        // 2 * 12 heads * 512^2 * 4 bytes.
        assert_eq!(a.attention_scores, 2 * 12 * 512 * 512 * 4);
        assert_eq!((a.kv_cache, a.logits), (0, 0), "an encoder has no cache");
        let expect = ((a.attention_scores + a.layer_other) as f64 * 1.5) as u64;
        assert_eq!(a.total, expect);
        let batch = Activations::estimate(&m, Workload { batch: 8, seq: 512 }, &c);
        assert_eq!(batch.attention_scores, 8 * a.attention_scores);
    }

    #[test]
    fn decoder_kv_cache_counts_kv_heads() {
        let shape = TransformerShape {
            architecture: TransformerKind::Decoder,
            hidden: 2048,
            layers: 22,
            heads: 32,
            kv_heads: 4,
            intermediate: 5632,
            vocab: 32000,
        };
        let a = Activations::estimate(
            &shape,
            Workload {
                batch: 1,
                seq: 2048,
            },
            &ActivationConfig::default(),
        );
        // 2 (K and V) * 23 (22 layers + one transient) * 2048 tokens * 4 heads * 64 dims * 4 bytes.
        assert_eq!(a.kv_cache, 2 * 23 * 2048 * 4 * 64 * 4);
        assert_eq!(a.logits, 32000 * 4);
    }

    #[test]
    fn absurd_sizes_saturate_instead_of_overflowing() {
        let m = minilm();
        let a = Activations::estimate(
            &m,
            Workload {
                batch: u64::MAX,
                seq: u64::MAX,
            },
            &ActivationConfig::default(),
        );
        assert_eq!(a.total, u64::MAX);
    }
}
