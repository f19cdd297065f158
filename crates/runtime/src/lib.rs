//! The snug facade: detect, plan, load models within budget, serve through
//! batcher and cache.

pub mod chunk;
mod error;

pub use crate::error::{Error, Result};
