//! Adaptive, layer-wise quantization of model weights on candle.
//!
//! `quant` decides which precision each weight of a model gets on the machine
//! it runs on, does it with candle's quantized tensors
//! (`candle_core::quantized::{QTensor, QMatMul}`), and keeps the result:
//!
//! - [`Format`]: F32, F16, Q8_0 (INT8), Q6_K, Q4_K (INT4), Q4_0, with their
//!   sizes and the fallback for shapes a block format cannot take.
//! - [`QLinear`]: a linear layer (`candle_core::Module`) whose weight is a
//!   [`QMatMul`](candle_core::quantized::QMatMul) and whose bias stays f32.
//!   Q8_0 layers run on an int8 kernel of this crate where the CPU has
//!   AVX-512 VNNI ([`int8_kernel_available`]), with candle's arithmetic.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use quant::{Format, QLinear};
//!
//! let w = Tensor::randn(0f32, 1.0, (64, 256), &Device::Cpu)?;
//! let x = Tensor::randn(0f32, 1.0, (2, 5, 256), &Device::Cpu)?;
//! let layer = QLinear::from_f32(w.clone(), None, Format::Q8_0)?;
//! let y = layer.forward(&x)?;
//! assert_eq!(y.dims(), &[2, 5, 64]);
//! // INT8 keeps the output within 1 % of the f32 layer.
//! let want = x.broadcast_matmul(&w.t()?)?;
//! let err = ((&y - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?
//!     / want.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
//! assert!(err < 1e-2);
//! // 384 inputs is not a multiple of 256: Q4_K falls back to Q8_0.
//! let small = QLinear::from_f32(Tensor::zeros((8, 384), candle_core::DType::F32, &Device::Cpu)?,
//!                               None, Format::Q4_K)?;
//! assert_eq!(small.format(), Format::Q8_0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`blocks`] holds matmul kernels for GGUF block formats (Q4_0, Q4_1,
//! Q5_0, Q8_0, Q4_K, Q6_K, F16, F32) on raw f32 buffers, with AVX-512 VNNI
//! paths and a persistent compute pool, for decoders read from GGUF.
//!
//! No feature flags.

pub mod blocks;
mod error;
mod format;
mod linear;
mod model;
mod plan;
mod policy;
mod resident;
#[cfg(test)]
mod testutil;
mod vnni;

pub use crate::error::{Error, Result};
pub use crate::format::Format;
pub use crate::linear::{
    candle_blocks_in_flight, forward_into_bytes, int8_kernel_available, ForwardBytes,
    LinearScratch, QLinear, CANDLE_AMX_BLOCK_ROWS, CANDLE_CHUNK_ROWS, CANDLE_TENSOR_BYTES,
};
pub use crate::model::{
    load_safetensors, quantize_safetensors, quantize_tensors, sha256_file, ArtifactMeta,
    QuantizedModel, FORMAT_VERSION,
};
pub use crate::plan::{
    measure, plan, select, uniform_bytes, Calibration, FormatCandidate, PlanEntry, QuantPlan,
    Sensitivity,
};
pub use crate::policy::{PolicyConfig, PolicyOverrides, QuantPolicy};
pub use crate::resident::resident_weight_bytes;
