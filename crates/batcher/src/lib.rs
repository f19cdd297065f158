//! Dynamic batching by size, weight and deadline, with priorities, cancellation and backpressure.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
