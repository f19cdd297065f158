//! What machine is this: cores by kind, memory (cgroup-aware), accelerators, and its hardware class.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
