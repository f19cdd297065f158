#!/usr/bin/env python3
"""Greedy continuations from llama.cpp, the golden ids of the decoder tests.

For each model and each fixed prompt, the prompt is tokenized by llama.cpp's
`llama-tokenize` (with BOS when the model adds it), then `llama-server`'s
/completion endpoint runs it as token ids with temperature 0 (greedy),
"n_predict" tokens and "return_tokens": true. The output JSON maps model ->
list of {prompt, prompt_ids, ids}.

    python3 scripts/decoder-golden.py > crates/models/tests/data/decoder_golden.json

llama.cpp comes from scripts/llama-cpp.sh; the models from scripts/fetch-model.sh.
"""
import json, os, subprocess, sys, time, urllib.request, ast

BIN = subprocess.check_output(["bash", "scripts/llama-cpp.sh", "--print"], text=True).strip()
MODELS = {
    "smollm2-135m": "models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "models/gemma3-270m/gemma-3-270m-q4_k_m.gguf",
}
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "To make a cup of tea, first",
    "The quick brown fox",
    "In 1969, the first humans",
    "A list of prime numbers: 2, 3, 5,",
    "The most important thing about writing software is",
]
N_PREDICT = int(os.environ.get("N_PREDICT", "32"))
PORT = 18431


def tokenize(model, text):
    out = subprocess.check_output(
        [f"{BIN}/llama-tokenize", "-m", model, "-p", text, "--ids", "--log-disable"], text=True)
    line = [l for l in out.splitlines() if l.strip().startswith("[")][-1]
    return ast.literal_eval(line)


def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/completion",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


result = {}
for name, model in MODELS.items():
    server = subprocess.Popen([f"{BIN}/llama-server", "-m", model, "-t", "2", "-c", "1024",
                               "--port", str(PORT), "-np", "1",
                               # The VM does not grant AMX tile state: without -nr
                               # ggml repacks for AMX and dies of SIGILL.
                               "-nr"],
                              stdout=subprocess.DEVNULL, stderr=open("/tmp/llama-server.log", "w"))
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as h:
                    if h.status == 200:
                        break
            except Exception:
                pass
            if server.poll() is not None:
                sys.exit(f"llama-server exited with {server.returncode}; see /tmp/llama-server.log")
            time.sleep(0.5)
        rows = []
        for p in PROMPTS:
            ids = tokenize(model, p)
            r = post({"prompt": ids, "n_predict": N_PREDICT, "temperature": 0.0, "top_k": 1,
                      "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True,
                      "ignore_eos": True})
            rows.append({"prompt": p, "prompt_ids": ids, "ids": r["tokens"]})
        result[name] = rows
    finally:
        server.terminate()
        server.wait()
json.dump(result, sys.stdout, indent=1)
print()
