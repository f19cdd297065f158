//! The snug facade: detect, plan, load models within budget, serve through batcher and cache.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
