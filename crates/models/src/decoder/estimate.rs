//! Memory of a decoder, known from the GGUF header before loading.

use candle_core::quantized::gguf_file::Content;
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::forward::Scratch;
use super::kv::KvLayout;
use super::DecoderConfig;
use crate::error::{Error, Result};

/// What a decoder will hold, in bytes, computed from the header alone (no
/// tensor data read). Each part is derived from what the code allocates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderEstimate {
    /// The weights as stored in the file (every tensor the decoder keeps).
    pub weights_bytes: u64,
    /// Repacked copies of weights kept beside them (none today: the matmuls
    /// run on the stored blocks).
    pub repacked_bytes: u64,
    /// Held only while loading: the largest tensor's read buffer, copied
    /// into its typed blocks.
    pub load_transient_bytes: u64,
    /// KV bytes per position per sequence of a full-attention group, as the
    /// pool holds them (block size-class rounding included).
    pub kv_bytes_per_token: f64,
    /// KV bytes of one sequence at the requested context.
    pub kv_bytes_per_sequence: u64,
    /// KV bytes of all sequences.
    pub kv_bytes: u64,
    /// Step scratch for `max_step_tokens` tokens (activations, RoPE angles,
    /// the matmul output copies).
    pub scratch_bytes: u64,
    /// Logits of one step when every sequence wants its last row.
    pub logits_bytes: u64,
    /// Sequences the estimate is for.
    pub sequences: usize,
    /// Context (positions per sequence) the estimate is for.
    pub context: usize,
}

impl DecoderEstimate {
    /// Estimate for `sequences` sequences of `context` positions each.
    pub fn from_header(
        content: &Content,
        opts: &DecoderConfig,
        sequences: usize,
        context: usize,
    ) -> Result<DecoderEstimate> {
        let cfg = ModelConfig::from_gguf(content)?;
        let layout = KvLayout::new(&cfg, opts.kv_type, opts.kv_block_tokens)?;
        let mut weights = 0u64;
        let mut largest = 0u64;
        let mut repacked = 0u64;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(bs) {
                return Err(Error::BadTensor {
                    name: name.clone(),
                    reason: format!(
                        "{elems} elements are not whole {:?} blocks of {bs}",
                        info.ggml_dtype
                    ),
                });
            }
            let bytes = (elems / bs * info.ggml_dtype.type_size()) as u64;
            weights += bytes;
            largest = largest.max(bytes);
            // Matrices are repacked for the kernels (`quant::blocks`); the
            // repacked copy replaces the stored one, and its extra bytes
            // (Q4_K's unpacked scales) come from the kernel's own formula.
            if let [rows, cols] = info.shape.dims() {
                let resident = quant::blocks::resident_bytes_for(info.ggml_dtype, *rows, *cols)?;
                repacked += resident.saturating_sub(bytes);
            }
        }
        let step = opts.max_step_tokens.max(1);
        let per_seq = layout.sequence_bytes(context, step.min(context.max(1))) as u64;
        let full: f64 = layout
            .groups
            .iter()
            .map(|g| g.class_bytes as f64 / g.block_tokens as f64)
            .sum();
        // The matmul wrapper copies each product once out of candle's tensor
        // and candle quantizes the input rows (at most 1.0625 bytes a value,
        // Q8_K / Q8_0 / Q8_1), so a step holds one output of the widest
        // matmul and one quantized input beside the scratch.
        let scratch = Scratch::floats_for(&cfg, step) as u64 * 4
            + (step * cfg.ffn.max(cfg.q_dim()) * 4) as u64
            + (step * cfg.ffn.max(cfg.hidden) * 2) as u64;
        let logit_rows = sequences.max(1).min(step);
        // candle's product and the copy the step returns.
        let logits = (logit_rows * cfg.vocab * 4) as u64 * 2;
        Ok(DecoderEstimate {
            weights_bytes: weights,
            repacked_bytes: repacked,
            load_transient_bytes: largest,
            kv_bytes_per_token: full,
            kv_bytes_per_sequence: per_seq,
            kv_bytes: per_seq * sequences as u64,
            scratch_bytes: scratch,
            logits_bytes: logits,
            sequences,
            context,
        })
    }

    /// Peak bytes while running: weights, KV, scratch and logits (the load
    /// transient is over by then).
    pub fn running_bytes(&self) -> u64 {
        self.weights_bytes
            + self.repacked_bytes
            + self.kv_bytes
            + self.scratch_bytes
            + self.logits_bytes
    }

    /// Peak bytes over the decoder's life: the larger of loading (weights
    /// plus the transient) and running.
    pub fn peak_bytes(&self) -> u64 {
        self.running_bytes()
            .max(self.weights_bytes + self.load_transient_bytes)
    }
}
