//! Reusable buffers under a hard byte budget, with RAII leases and backpressure.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
