#!/usr/bin/env bash
# Writes crates/models/tests/data/llama_greedy.json: llama.cpp's greedy
# continuations (the first 32 tokens) of 10 fixed prompts per model, for the
# decoder to be compared against token for token.
#
#   bash scripts/llama-greedy.sh
#
# For each model (fetched by scripts/fetch-model.sh), each prompt is tokenized
# by llama-tokenize as it runs by default (BOS where the model asks for it,
# special tokens parsed) and its ids are sent to llama-server's /completion on
# 127.0.0.1 with temperature 0, top-k 1 and no penalties; the reply's token ids
# are recorded with the two best log-probabilities at each step (their
# difference is the logit margin of the choice), and whether generation ended
# on an end-of-generation token before 32 tokens. llama.cpp comes from
# scripts/llama-cpp.sh. PORT (default 18089) and THREADS (default 2) can be set;
# LLAMA_REPACK=0 passes --no-repack (see scripts/llama-bench.sh: hosts where
# llama.cpp's AMX kernels die of SIGILL).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'llama-greedy: error: %s\n' "$*" >&2; exit 1; }

BIN="$(bash scripts/llama-cpp.sh --print)" || die "llama.cpp is not built; run 'bash scripts/llama-cpp.sh' first"
ROOT="${SNUG_MODELS_ROOT:-models}"
PORT="${PORT:-18089}"
THREADS="${THREADS:-2}"
REPACK=()
[[ "${LLAMA_REPACK:-1}" == 0 ]] && REPACK=(--no-repack)
OUT="crates/models/tests/data/llama_greedy.json"
mkdir -p "$(dirname "$OUT")"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/snug-llama-greedy.XXXXXX")"
SERVER_PID=""
cleanup() {
    [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

for name in smollm2-135m gemma3-270m; do
    case "$name" in
    smollm2-135m) file="$ROOT/$name/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    gemma3-270m) file="$ROOT/$name/gemma-3-270m-q4_k_m.gguf" ;;
    esac
    [[ -f "$file" ]] || die "$file is missing; run scripts/fetch-model.sh $name"
    printf 'llama-greedy: %s: starting llama-server on 127.0.0.1:%s\n' "$name" "$PORT" >&2
    "$BIN/llama-server" -m "$file" -t "$THREADS" -c 2048 -np 1 --host 127.0.0.1 --port "$PORT" \
        --no-webui "${REPACK[@]+"${REPACK[@]}"}" >"$TMP/server-$name.log" 2>&1 &
    SERVER_PID=$!
    python3 - "$BIN/llama-tokenize" "$file" "$name" "$PORT" "$TMP/$name.json" "$SERVER_PID" <<'PY' ||
import json, os, subprocess, sys, time, urllib.request

tok_bin, path, name, port, out, pid = sys.argv[1:7]
base = f"http://127.0.0.1:{port}"

plain = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "1, 2, 3, 4, 5,",
    "Water boils at a temperature of",
    "The quick brown fox",
]
chat = [
    "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nExplain photosynthesis in one sentence.<|im_end|>\n<|im_start|>assistant\n",
]
gemma_extra = [
    "Question: What is the largest planet in the solar system?\nAnswer:",
    "In 1969, the first humans landed on",
    "Translate to French: Good morning, how are you?\nFrench:",
]
prompts = plain + (chat if name == "smollm2-135m" else gemma_extra)
assert len(prompts) == 10

def alive():
    try:
        os.kill(int(pid), 0)
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except (OSError, IndexError):
        return False

for _ in range(600):
    if not alive():
        sys.exit("llama-greedy: error: llama-server exited (exit status 132 is SIGILL: try LLAMA_REPACK=0)")
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    time.sleep(0.2)
else:
    sys.exit("llama-greedy: error: llama-server did not become healthy within 120 s")

cases = []
for p in prompts:
    r = subprocess.run([tok_bin, "-m", path, "--stdin", "--no-escape", "--ids", "--log-disable"],
                       input=p.encode(), capture_output=True, check=True)
    ids = json.loads(r.stdout.decode().strip().splitlines()[-1])
    body = {
        "prompt": ids, "n_predict": 32, "temperature": 0, "top_k": 1, "top_p": 1.0, "min_p": 0.0,
        "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0,
        "cache_prompt": False, "return_tokens": True, "n_probs": 2, "post_sampling_probs": False,
    }
    req = urllib.request.Request(base + "/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            res = json.loads(resp.read())
    except Exception as e:
        sys.exit(f"llama-greedy: error: /completion failed ({e}); if llama-server died of SIGILL, try LLAMA_REPACK=0")
    probs = res.get("completion_probabilities", [])
    top2 = [[round(t["logprob"], 4) for t in c.get("top_logprobs", [])[:2]] for c in probs]
    cases.append({
        "prompt": p,
        "prompt_ids": ids,
        "ids": res["tokens"],
        "text": res["content"],
        "stop_type": res.get("stop_type"),
        "top2_logprobs": top2,
    })
    print(f"llama-greedy: {name}: {len(res['tokens'])} tokens ({res.get('stop_type')}) for {p[:40]!r}", file=sys.stderr)
json.dump(cases, open(out, "w"), ensure_ascii=False)
PY
        die "collecting $name's continuations failed; llama-server's log: $(tail -5 "$TMP/server-$name.log")"
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
done

python3 - "$TMP" "$OUT" <<'PY'
import json, sys
tmp, out = sys.argv[1:3]
models = {n: json.load(open(f"{tmp}/{n}.json")) for n in ("smollm2-135m", "gemma3-270m")}
with open(out, "w", encoding="utf-8") as f:
    f.write("{\n")
    f.write('"generator": "scripts/llama-greedy.sh: llama.cpp 0.3.36 llama-server /completion, temperature 0, top_k 1, n_predict 32; prompt ids from llama-tokenize",\n')
    f.write('"models": {\n')
    parts = []
    for name, cases in models.items():
        parts.append(f'"{name}": [\n' + ",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases) + "\n]")
    f.write(",\n".join(parts) + "\n}\n}\n")
print(f"llama-greedy: wrote {out}", file=sys.stderr)
PY
