//! Adaptive, layer-wise quantization of model weights on candle.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
