#!/usr/bin/env bash
# Runs every bench of the workspace in a quick mode (a few minutes in all) and
# prints one table of the figures, each with its ratio to the in-run baseline
# of its group and its change against the previous run on this machine.
#
#   bash scripts/bench-ci.sh                 # all benches
#   bash scripts/bench-ci.sh cache quant     # some of them
#
# Criterion's `--quick` mode measures each benchmark until its relative
# standard deviation is under 5% (at least 100 ms, at most the group's
# measurement time), so the figures are indicative: they are for spotting a
# change of tens of per cent, not for quoting. The run's estimates are kept in
# target/bench-ci/estimates.json and in
# ${SNUG_CACHE_DIR:-$HOME/.cache/snug}/bench-ci/ (the previous run's file is
# what the "change" column compares against).
set -euo pipefail
cd "$(dirname "$0")/.."

CRITERION_BENCHES=(mem_budget buffer_pool batcher cache quant gguf_kernels generate)
if (($# > 0)); then
    selected=("$@")
else
    selected=("${CRITERION_BENCHES[@]}" models)
fi

target="${CARGO_TARGET_DIR:-target}"
rm -rf "$target/criterion"
mkdir -p "$target/bench-ci"

cargo bench --workspace --locked --no-run --quiet

for bench in "${selected[@]}"; do
    start=$(date +%s)
    if [[ "$bench" == models ]]; then
        # A custom harness (sentences per second beside candle-transformers'
        # BertModel in the same run); a small corpus keeps it short.
        SNUG_BENCH_SENTENCES="${SNUG_BENCH_SENTENCES:-64}" \
            cargo bench --workspace --locked --quiet --bench models | tee "$target/bench-ci/models.txt"
    else
        cargo bench --workspace --locked --quiet --bench "$bench" -- --quick --noplot \
            >"$target/bench-ci/$bench.txt" 2>&1 ||
            { cat "$target/bench-ci/$bench.txt"; echo "bench-ci: bench $bench failed" >&2; exit 1; }
    fi
    printf 'bench-ci: %s took %ss\n' "$bench" "$(( $(date +%s) - start ))" >&2
done

python3 scripts/bench-report.py "$target/criterion" \
    --out "$target/bench-ci/estimates.json" \
    --history "${SNUG_CACHE_DIR:-$HOME/.cache/snug}/bench-ci"
