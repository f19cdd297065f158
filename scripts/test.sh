#!/usr/bin/env bash
# Runs the whole test suite: every crate's unit, integration and doc tests.
# Everything the tests need is set up here first, so this one command passes
# on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# The models crate tests run all-MiniLM-L6-v2, SmolLM2-135M and Gemma-3-270M;
# fetch them (a no-op when present and verified). A failed fetch fails the run:
# the model tests are never skipped.
bash scripts/fetch-model.sh all
# Release mode: the model tests run whole forward passes, and the release
# build is the one `cargo run --release --example ...` and the benches use,
# so the README's two commands and CI's bench step share one build.
cargo test --workspace --locked --release "$@"
