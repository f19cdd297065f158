//! Reference models on candle and quant: all-MiniLM-L6-v2 sentence embeddings first.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
