//! A concurrent, byte-bounded cache with TTL, warming, statistics and a versioned disk tier.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
