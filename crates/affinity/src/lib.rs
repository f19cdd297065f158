//! Which cores inference threads should run on, and pinning them where the OS allows.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
