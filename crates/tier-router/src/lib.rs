//! Which model tier serves a task, with circuit breakers, retries and a fallback chain.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
