//! Which model tier serves a task, with circuit breakers, retries and a fallback chain.
//!
//! A [`Router`] holds an ordered table of tiers ([`Tier::Small`], `Medium`, `Large`,
//! `Remote`, `RuleBased`), each served by a [`Backend`] and guarded by its own
//! [`CircuitBreaker`]. For each task it:
//!
//! 1. scores the task's [`TaskFeatures`] (tokens dominate; senior grades and technical
//!    subjects raise the score) and picks the local tier the score asks for;
//! 2. asks a [`MemoryGate`] for the [`PressureLevel`] and whether each tier's model fits, and
//!    orders the chain: `Normal` → local tiers first; `Elevated`/`High` → accelerator and remote
//!    tiers first; `Critical` → rule-based only ([`Router::route`] explains every choice);
//! 3. serves through the chain ([`Router::serve`]): transient errors are retried with
//!    exponential backoff and jitter within the deadline, a failing or open tier hands over to
//!    the next, and the [`Served`] response records which tier served it and why the others
//!    did not.
//!
//! `RemoteEmbedder` (feature `remote`) is an HTTP backend for OpenAI-compatible
//! `/v1/embeddings` servers, and `RemoteChat` a streaming client for their
//! `/v1/chat/completions` (server-sent events read chunk by chunk; the snug runtime
//! guards it with a [`CircuitBreaker`] as its remote generation tier). A rule-based tier is any backend that never fails; the `models`
//! crate's `RuleBasedEmbedder` (feature hashing) is the one the snug runtime uses.
//!
//! ```
//! use std::sync::Arc;
//! use tier_router::{
//!     BackendError, Deadline, FixedGate, PressureLevel, Router, RouterConfig, TaskFeatures, Tier,
//!     TierSpec,
//! };
//!
//! let gate = Arc::new(FixedGate { pressure: PressureLevel::Normal, available_bytes: 1 << 30 });
//! let router = Router::new(RouterConfig::default(), gate)?;
//! // A local tier whose model is down: it fails permanently.
//! let broken = |_: &[String], _: Deadline| -> Result<Vec<Vec<f32>>, BackendError> {
//!     Err(BackendError::permanent("model file missing"))
//! };
//! let router = router.with_tier(TierSpec::new("minilm", Tier::Small, Arc::new(broken)).memory_bytes(100 << 20))?;
//! // A rule-based tier: one vector per text, never fails.
//! let rule = |texts: &[String], _: Deadline| -> Result<Vec<Vec<f32>>, BackendError> {
//!     Ok(texts.iter().map(|t| vec![t.len() as f32; 8]).collect())
//! };
//! let router = router.with_tier(TierSpec::new("hashing", Tier::RuleBased, Arc::new(rule)))?;
//!
//! let texts = vec!["hello world".to_string()];
//! let served = router.serve(&TaskFeatures::with_tokens(3), &texts[..], Deadline::none())?;
//! assert_eq!(served.tier, Tier::RuleBased);
//! assert_eq!(served.response[0].len(), 8);
//! assert_eq!(served.trail.len(), 2); // minilm failed, then hashing served
//! assert!(served.trail[0].to_string().contains("model file missing"));
//! # Ok::<(), tier_router::Error>(())
//! ```
//!
//! The crate depends on no memory accountant: a program answers the [`MemoryGate`]'s two
//! questions itself (the snug runtime's `LedgerGate` answers them from mem-budget's ledger and
//! pressure monitor). It uses no async runtime: backends are called on the caller's thread and
//! retries sleep on it.
//!
//! # Feature flags
//!
//! - `remote` (off by default): `RemoteConfig` and `RemoteEmbedder`, the blocking HTTP client
//!   of the remote tier, and `RemoteChatConfig` and `RemoteChat`, its streaming chat client,
//!   on `ureq`. Without it the crate compiles no HTTP client.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod breaker;
mod complexity;
mod error;
mod pressure;
#[cfg(feature = "remote")]
mod remote;
#[cfg(feature = "remote")]
mod remote_chat;
mod retry;
mod router;
mod tier;

pub use backend::{Backend, Deadline, EmbedBackend};
pub use breaker::{
    BreakerConfig, BreakerState, BreakerStats, CallOutcome, CircuitBreaker, Permit, Rejected,
    Transition, TransitionReason,
};
pub use complexity::{Complexity, ComplexityConfig, TaskFeatures};
pub use error::{BackendError, Error, ErrorKind, Result};
pub use pressure::{FixedGate, MemoryGate, PressureLevel};
#[cfg(feature = "remote")]
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
pub use remote::{RemoteConfig, RemoteEmbedder};
#[cfg(feature = "remote")]
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
pub use remote_chat::{
    ChatEvent, ChatMessage, ChatRequest, ChatStream, ChatUsage, RemoteChat, RemoteChatConfig,
};
pub use retry::RetryConfig;
pub use router::{
    Attempted, Candidate, EmbedRouter, GaveUp, Outcome, Role, RouteDecision, Router, RouterConfig,
    Served, SkipReason, Skipped, TierSpec,
};
pub use tier::{Placement, Tier};
