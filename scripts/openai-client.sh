#!/usr/bin/env bash
# Drives a snug server with the official `openai` Python client (installed
# from PyPI into a virtual environment under ~/.cache/snug/openai-venv):
# lists the models, streams a chat, asks for a whole chat, embeds two texts.
#
#   bash scripts/openai-client.sh --setup            # make the venv only
#   bash scripts/openai-client.sh BASE_URL CHAT_MODEL EMBED_MODEL
#
# Prints one JSON line per check; exits non-zero (with the reason) when the
# venv cannot be made or any check fails.
set -euo pipefail

VENV="${SNUG_OPENAI_VENV:-$HOME/.cache/snug/openai-venv}"
OPENAI_VERSION="${SNUG_OPENAI_VERSION:-1.109.1}"

setup() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import openai" 2>/dev/null; then
        return 0
    fi
    echo "openai-client: making $VENV with openai==$OPENAI_VERSION from PyPI" >&2
    python3 -m venv "$VENV" || { echo "openai-client: python3 -m venv $VENV failed" >&2; exit 3; }
    "$VENV/bin/pip" install --quiet "openai==$OPENAI_VERSION" \
        || { echo "openai-client: pip install openai==$OPENAI_VERSION failed (is PyPI reachable?)" >&2; exit 3; }
}

setup
if [ "${1:-}" = "--setup" ]; then
    exit 0
fi
if [ $# -ne 3 ]; then
    echo "usage: $0 BASE_URL CHAT_MODEL EMBED_MODEL   (or --setup)" >&2
    exit 2
fi

exec "$VENV/bin/python" - "$@" <<'PY'
import json
import sys

import openai

base, chat_model, embed_model = sys.argv[1:4]
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0, timeout=120)

models = [m.id for m in client.models.list()]
assert chat_model in models, f"{chat_model} not in {models}"
assert embed_model in models, f"{embed_model} not in {models}"
print(json.dumps({"check": "models", "models": models}))

stream = client.chat.completions.create(
    model=chat_model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=8,
    stream=True,
    stream_options={"include_usage": True},
)
text, finish, usage, chunks = "", None, None, 0
for chunk in stream:
    chunks += 1
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.choices:
        delta = chunk.choices[0].delta
        if delta.content:
            text += delta.content
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    if chunk.usage:
        usage = chunk.usage
assert finish in ("stop", "length"), finish
assert usage is not None and usage.completion_tokens > 0, usage
assert text, "no text streamed"
print(json.dumps({"check": "chat_stream", "text": text, "finish_reason": finish,
                  "chunks": chunks, "completion_tokens": usage.completion_tokens}))

whole = client.chat.completions.create(
    model=chat_model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=6,
)
assert whole.choices[0].message.role == "assistant"
assert whole.usage.completion_tokens > 0
snug = (whole.model_extra or {}).get("snug", {})
assert snug.get("model") == chat_model, snug
print(json.dumps({"check": "chat", "text": whole.choices[0].message.content,
                  "tier": snug.get("tier"), "model": snug.get("model")}))

emb = client.embeddings.create(model=embed_model, input=["The cat sits outside", "A man plays guitar"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
print(json.dumps({"check": "embeddings", "count": len(emb.data), "dim": len(emb.data[0].embedding)}))

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown model was answered")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e.code
    print(json.dumps({"check": "unknown_model", "status": e.status_code, "code": e.code}))
PY
