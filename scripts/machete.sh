#!/usr/bin/env bash
# Fails when a crate of the workspace declares a dependency that its code
# never uses (cargo-machete reads the sources; it builds nothing). It runs
# with --with-metadata, which reads every crate's targets from cargo
# metadata (the plain text scan misses unused dev-dependencies); the root
# package lists there the dependencies that only its examples and benches
# use, which that mode does not read.
#
# cargo-machete is installed once into
# ${SNUG_CACHE_DIR:-$HOME/.cache/snug}/tools (from crates.io, `--locked`) and
# reused from there.
#
#   bash scripts/machete.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="0.9.2"
TOOLS="${SNUG_CACHE_DIR:-$HOME/.cache/snug}/tools"
BIN="$TOOLS/bin/cargo-machete"

if [[ ! -x "$BIN" ]] || ! "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
    printf 'machete: installing cargo-machete %s into %s\n' "$VERSION" "$TOOLS" >&2
    cargo install cargo-machete --version "$VERSION" --locked --quiet --root "$TOOLS"
fi

exec "$BIN" --with-metadata
