#!/usr/bin/env bash
# llama.cpp's speed on a model fetched by scripts/fetch-model.sh — the peer
# figures the generation benchmarks print beside their own.
#
#   bash scripts/llama-bench.sh MODEL [--json]     MODEL: smollm2-135m | gemma3-270m
#
# Runs, with llama.cpp built by scripts/llama-cpp.sh:
#   llama-bench -t 2 -p 128,512 -n 128                 (prefill 128 / 512, decode 1 sequence)
#   llama-batched-bench -t 2 -c 8192 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,4,8,16
#                                                      (aggregate decode at 1 / 4 / 8 / 16 sequences)
#   llama-batched-bench -t 2 -c 2048 -npp 2016 -ntg 32 -npl 1
#                                                      (peak RSS of one sequence filled to context 2048, under GNU time)
# and prints a compact table of tokens/s, or with --json one JSON object:
#   {"model", "file", "threads", "prefill_128", "prefill_512", "decode_1",
#    "peak_rss_ctx2048_mib", "batched": {"1": {"prefill", "decode"}, "4": ..., "8": ..., "16": ...}}
# (decode in "batched" is the aggregate over all sequences). Timing runs should
# hold a lock so that only one runs at a time, e.g. `flock LOCKFILE bash scripts/llama-bench.sh ...`.
# THREADS (default 2) changes -t. LLAMA_REPACK=0 turns off llama.cpp's weight
# repacking into extra buffer types (--repack 0 / --no-repack): on hosts whose
# CPU advertises AMX but whose kernel or hypervisor does not let a process use
# it, llama.cpp built with -march=native dies with SIGILL in its AMX kernels.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'llama-bench: error: %s\n' "$*" >&2; exit 1; }

MODEL="${1:-}"
JSON=0
[[ "${2:-}" == "--json" || "${1:-}" == "--json" ]] && JSON=1
[[ "$MODEL" == "--json" ]] && MODEL="${2:-}"
case "$MODEL" in
smollm2-135m) FILE="SmolLM2-135M-Instruct.Q4_1.gguf" ;;
gemma3-270m) FILE="gemma-3-270m-q4_k_m.gguf" ;;
*) die "usage: scripts/llama-bench.sh smollm2-135m|gemma3-270m [--json] (got '${MODEL}')" ;;
esac
PATH_GGUF="${SNUG_MODELS_ROOT:-models}/$MODEL/$FILE"
[[ -f "$PATH_GGUF" ]] || die "$PATH_GGUF is missing; run scripts/fetch-model.sh $MODEL"
BIN="$(bash scripts/llama-cpp.sh --print)" || die "llama.cpp is not built; run 'bash scripts/llama-cpp.sh' first"
THREADS="${THREADS:-2}"
REPACK="${LLAMA_REPACK:-1}"
BENCH_REPACK=(--repack "$REPACK")
COMMON_REPACK=()
[[ "$REPACK" == 0 ]] && COMMON_REPACK=(--no-repack)

# why RC LOG: a message for a failed llama.cpp run (SIGILL names LLAMA_REPACK=0).
why() {
    if [[ "$1" == 132 ]]; then
        printf 'it died of SIGILL (an instruction this CPU does not run: the AMX kernels on a host that advertises but does not allow AMX); rerun with LLAMA_REPACK=0'
    else
        printf 'exit status %s: %s' "$1" "$(tail -5 "$2")"
    fi
}

TMP="$(mktemp -d "${TMPDIR:-/tmp}/snug-llama-bench.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

printf 'llama-bench: %s: llama-bench -t %s -p 128,512 -n 128\n' "$MODEL" "$THREADS" >&2
rc=0
"$BIN/llama-bench" -m "$PATH_GGUF" -t "$THREADS" -p 128,512 -n 128 "${BENCH_REPACK[@]}" -o json \
    >"$TMP/bench.json" 2>"$TMP/bench.err" || rc=$?
[[ $rc == 0 ]] || die "llama-bench failed: $(why "$rc" "$TMP/bench.err")"
printf 'llama-bench: %s: llama-batched-bench -t %s -c 8192 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,4,8,16\n' "$MODEL" "$THREADS" >&2
"$BIN/llama-batched-bench" -m "$PATH_GGUF" -t "$THREADS" -c 8192 -b 2048 -ub 512 -npp 128 -ntg 128 \
    -npl 1,4,8,16 "${COMMON_REPACK[@]+"${COMMON_REPACK[@]}"}" --output-format jsonl >"$TMP/batched.out" 2>&1 || rc=$?
[[ $rc == 0 ]] || die "llama-batched-bench failed: $(why "$rc" "$TMP/batched.out")"

# Peak RSS with one sequence filled to context 2048 (f16 KV), as
# generate_bench's own child does (a 2016-token prompt, then 32 tokens), under
# GNU time. (Not llama-perplexity: it keeps the logits of every position,
# 2048 x vocab floats, which no generation holds.)
printf 'llama-bench: %s: llama-batched-bench -t %s -c 2048 -npp 2016 -ntg 32 -npl 1 (peak RSS)\n' "$MODEL" "$THREADS" >&2
/usr/bin/time -f 'MAXRSS_KIB %M' -o "$TMP/rss.txt" "$BIN/llama-batched-bench" -m "$PATH_GGUF" -t "$THREADS" -c 2048 \
    -b 2048 -ub 512 -npp 2016 -ntg 32 -npl 1 "${COMMON_REPACK[@]+"${COMMON_REPACK[@]}"}" >"$TMP/rss.out" 2>&1 || rc=$?
[[ $rc == 0 ]] || die "llama-batched-bench (peak RSS) failed: $(why "$rc" "$TMP/rss.out")"

python3 - "$TMP/bench.json" "$TMP/batched.out" "$MODEL" "$PATH_GGUF" "$THREADS" "$JSON" "$REPACK" "$TMP/rss.txt" <<'PY'
import json, sys

bench_path, batched_path, model, path, threads, as_json, repack, rss_path = sys.argv[1:9]
res = {"model": model, "file": path, "threads": int(threads), "repack": repack != "0"}
for line in open(rss_path):
    if line.startswith("MAXRSS_KIB "):
        res["peak_rss_ctx2048_mib"] = round(int(line.split()[1]) / 1024, 1)
for t in json.load(open(bench_path)):
    if t.get("n_gen", 0) == 0:
        res[f"prefill_{t['n_prompt']}"] = round(t["avg_ts"], 1)
    elif t.get("n_prompt", 0) == 0:
        res[f"decode_{1}"] = round(t["avg_ts"], 1)
batched = {}
for line in open(batched_path, errors="replace"):
    line = line.strip()
    if line.startswith("{") and '"speed_tg"' in line:
        r = json.loads(line)
        batched[str(r["pl"])] = {"prefill": round(r["speed_pp"], 1), "decode": round(r["speed_tg"], 1)}
res["batched"] = batched
missing = [k for k in ("prefill_128", "prefill_512", "decode_1", "peak_rss_ctx2048_mib") if k not in res]
missing += [f"batched {n}" for n in ("1", "4", "8", "16") if n not in batched]
if missing:
    sys.exit(f"llama-bench: error: no figure for {', '.join(missing)} in llama.cpp's output")
if as_json == "1":
    print(json.dumps(res))
else:
    b = batched
    print(f"llama.cpp on {model} ({threads} threads{'' if repack != '0' else ', no repacking'}), tokens/s")
    print(f"  prefill 128    {res['prefill_128']:8.1f}")
    print(f"  prefill 512    {res['prefill_512']:8.1f}")
    print(f"  decode, 1 seq  {res['decode_1']:8.1f}   (batched-bench: {b['1']['decode']:.1f})")
    print(f"  aggregate decode  4 seqs {b['4']['decode']:8.1f}   8 seqs {b['8']['decode']:8.1f}   16 seqs {b['16']['decode']:8.1f}")
    print(f"  peak RSS, context 2048, one sequence: {res['peak_rss_ctx2048_mib']:.1f} MiB")
PY
