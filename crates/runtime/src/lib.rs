//! The snug facade: detect the machine, plan memory and precision for it,
//! load models lazily within a budget, serve requests through a batcher and
//! a cache, and degrade by tier instead of falling over.
//!
//! ```no_run
//! let rt = runtime::Runtime::builder().build()?;
//! println!("{}", rt.plan());
//! let out = rt.embed(&["How is the weather today?", "What is the weather like?"])?;
//! let cos: f32 = out.vectors[0].iter().zip(&out.vectors[1]).map(|(a, b)| a * b).sum();
//! assert!(cos > 0.5);
//! # Ok::<(), runtime::Error>(())
//! ```
//!
//! Without a local model the runtime still answers, from the rule-based
//! tier that never fails:
//!
//! ```
//! let rt = runtime::Runtime::builder().without_local_model().build()?;
//! let out = rt.embed(&["a cat sits on the mat"])?;
//! assert_eq!(out.vectors[0].len(), 384);
//! assert_eq!(out.tier, Some(runtime::router::Tier::RuleBased));
//! # Ok::<(), runtime::Error>(())
//! ```
//!
//! Each building block is re-exported as a module, usable alone:
//! [`hw`], [`budget`], [`quant`], [`affinity`], [`router`], [`cache`],
//! [`batcher`], [`pool`], and the reference [`models`].
//!
//! # Feature flags
//!
//! - `local` (default): the [`Runtime`] with local models and quantization
//!   on candle. Without it (`default-features = false`) the crate is the
//!   building blocks alone — the ledger, the batcher, the cache, the pools,
//!   the router, affinity and hardware detection — and compiles no candle.
//! - `remote` (default): the router's remote tier (`tier-router/remote`, an
//!   HTTP client on ureq) — `router::RemoteEmbedder`, and with `local` the
//!   `RuntimeConfig::remote` field and `RuntimeBuilder::remote`, which add
//!   an OpenAI-compatible embeddings server as a fallback tier, and
//!   `RuntimeConfig::remote_generation` / `RuntimeBuilder::remote_generation`
//!   ([`RemoteGenerationConfig`]), an OpenAI-compatible chat server whose
//!   streamed `/v1/chat/completions` is a generation tier behind a circuit
//!   breaker.
//!
//! [`LedgerGate`] joins the ledger and the pressure monitor as the router's
//! memory gate (with or without `local`).
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Items that need the `local` feature (the `Runtime` and its models),
/// marked so in the docs, as tokio's `cfg_rt!` does.
macro_rules! cfg_local {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "local")]
            #[cfg_attr(docsrs, doc(cfg(feature = "local")))]
            $item
        )*
    };
}

cfg_local! {
mod builder;
pub mod chunk;
mod cleanup;
mod config;
mod decoder;
mod embed;
mod error;
mod generate;
mod generation;
mod model;
mod models_file;
mod plan;
mod prefix;
mod registry;
#[cfg(feature = "remote")]
mod remote;
mod runtime;
mod status;

pub use crate::builder::RuntimeBuilder;
pub use crate::cleanup::{CleanupReport, Reoptimized};
pub use crate::config::{BatchSettings, RuntimeConfig};
pub use crate::decoder::{
    GenerationPlan, GenerativeSpec, GenerativeStatus, ALONE_ROOM_WAIT, KV_GROW_TOKENS,
};
pub use crate::embed::{EmbedOptions, Embeddings, RequestEstimate};
pub use crate::error::{Error, Result};
pub use crate::generate::{ModelInfo, ModelKind, AUTO, RULE_BASED};
pub use crate::generation::{
    Completion, FinishReason, Finished, GenerateRequest, Generation, GenerationEvent, Prompt,
    Served, Timings, Usage,
};
pub use crate::model::{
    minilm_estimate, minilm_options, tokenizer_bytes, variant_label, EmbeddingModel, LoadContext,
    LoadEvent, MiniLmEstimate, MiniLmVariants, ModelSpec, Tokens, Variant, INT4_PLAN_MIX,
};
pub use crate::models_file::{EmbeddingEntry, ModelsFile};
pub use crate::plan::Plan;
pub use crate::registry::ModelStatus;
#[cfg(feature = "remote")]
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
pub use crate::remote::RemoteGenerationConfig;
pub use crate::runtime::{Runtime, MINILM};
pub use crate::status::{Status, Throttling, TierBreaker};
}

mod gate;
pub use crate::gate::{router_pressure, LedgerGate};

/// CPU affinity (`affinity`).
pub use affinity;
/// Dynamic batching (`batcher`).
pub use batcher;
/// Buffer pools (`buffer-pool`).
pub use buffer_pool as pool;
/// The feature cache (`feature-cache`).
pub use feature_cache as cache;
/// Hardware detection (`hw-detect`).
pub use hw_detect as hw;
/// Memory budgets, estimates, the ledger and pressure (`mem-budget`).
pub use mem_budget as budget;
cfg_local! {
/// Reference models (`models`).
pub use models;
/// Quantization (`quant`).
pub use quant;
}
/// Tier routing with breakers and fallback (`tier-router`).
pub use tier_router as router;

#[doc(inline)]
pub use hw_detect::{HardwareClass, HardwareProfile};
#[doc(inline)]
pub use mem_budget::PressureLevel;
cfg_local! {
#[doc(inline)]
pub use quant::Format;
}
