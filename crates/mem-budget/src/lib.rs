//! Memory budgets per hardware class, pre-flight estimates, a reservation ledger and pressure levels.
//!
//! This crate is part of the snug workspace; its functionality is being built.
//! See the workspace's `docs/architecture.md` for where it fits.
