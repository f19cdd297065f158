#!/usr/bin/env bash
# Writes crates/models/tests/data/tokenizer_golden.json: llama.cpp's token ids
# for 200 varied strings, for SmolLM2-135M and Gemma-3-270M, so that the
# `tokenizer` test can check our GGUF tokenizers against a tokenizer nobody
# here wrote.
#
#   bash scripts/tokenizer-golden.sh
#
# Needs llama.cpp built by scripts/llama-cpp.sh (llama-tokenize) and the models
# fetched by scripts/fetch-model.sh. Each string goes to
# `llama-tokenize -m FILE --stdin --no-escape --ids --log-disable` twice: as
# llama-tokenize runs by default (BOS where the model asks for it, special
# tokens parsed) and with --no-bos.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'tokenizer-golden: error: %s\n' "$*" >&2; exit 1; }

BIN="$(bash scripts/llama-cpp.sh --print)" || die "llama.cpp is not built; run 'bash scripts/llama-cpp.sh' first"
ROOT="${SNUG_MODELS_ROOT:-models}"
SMOL="$ROOT/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA="$ROOT/gemma3-270m/gemma-3-270m-q4_k_m.gguf"
[[ -f "$SMOL" ]] || die "$SMOL is missing; run scripts/fetch-model.sh smollm2-135m"
[[ -f "$GEMMA" ]] || die "$GEMMA is missing; run scripts/fetch-model.sh gemma3-270m"
OUT="crates/models/tests/data/tokenizer_golden.json"
mkdir -p "$(dirname "$OUT")"

python3 - "$BIN/llama-tokenize" "$SMOL" "$GEMMA" "$OUT" <<'PY'
import json, random, subprocess, sys

tok_bin, smol, gemma, out = sys.argv[1:5]

texts = [
    # empty and whitespace only
    "", " ", "  ", "   ", "\n", "\n\n", "\t", " \t\n ", "\r\n", "\n\n\n\n\n\n\n\n",
    # plain words, spaces at the ends and in between
    "Hello world", " Hello world", "Hello world ", "Hello  world", "  Hello   world   ",
    "hello", "HELLO", "Hello, World!", "The quick brown fox jumps over the lazy dog.",
    "a b c d e f g", "a  b   c    d", "word\tword\t\tword", "end with newline\n",
    "\nstart with newline", "  leading two", "trailing two  ", "x" + " " * 20 + "y",
    " " * 33 + "deep indent", "\t\t\tindented with tabs",
    # digits and numbers
    "1", "12", "123", "1234", "12345", "12345678901234567890", "3.14159265358979",
    "1,000,000", "-42", "+7", "0x1F2E", "0b1011", "1e-9", "2024-12-01T08:45:00Z",
    "$19.99", "€5,00", "100%", "１２３", "٣٤٥", "Ⅻ", "½ ¾", "call 555-0123 now",
    "v1.2.3", "IPv4 192.168.0.1", "pi is 3.14 and e is 2.71",
    # contractions and punctuation
    "I'm", "don't", "they'll", "we've", "it's", "She'd", "DON'T", "'s", "you're right",
    "!!!", "...", "?!", "---", "***", "~~~", "(a) [b] {c}", "\"quoted\" and 'single'",
    "a,b;c:d", "hello...world", "¿Qué?", "¡Hola!", "«guillemets»", "–—", "…",
    # scripts
    "你好，世界", "こんにちは世界", "안녕하세요", "Привет, мир!", "Γειά σου Κόσμε",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Xin chào thế giới",
    "café naïve résumé", "Größe Straße", "İstanbul ıi", "e\u0301 combining", "ﬁ ligature",
    "zero\u200bwidth", "Ελληνικά και English", "日本語とEnglishのmix", "ქართული", "Հայերեն",
    "தமிழ்", "বাংলা", "ᚠᛇᚻ runes", "𝕳𝖊𝖑𝖑𝖔 math letters", "Ω≈ç√∫",
    # emoji
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "I ❤️ Rust 🦀", "🙂🙃🙂🙃", "emoji at end 🎉", "🔥fire",
    # code
    "def f(x):\n    return x * 2\n",
    "fn main() {\n    println!(\"hi\");\n}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "<div class=\"a\">x</div>", "<table><tr><td>1</td></tr></table>",
    "SELECT * FROM users WHERE id = 42;", "ls -la | grep '^d' > out.txt 2>&1",
    "^[a-z0-9_]+@[a-z]+\\.[a-z]{2,}$", "# Title\n\n- item one\n- item two\n\n```rust\nlet x = 1;\n```",
    "if x == 1:\n\tpass\nelse:\n\tprint('no')", "x += 1; y -= 2; z *= 3; w /= 4;",
    "#include <stdio.h>\nint main(void) { return 0; }", "const f = (a, b) => a ?? b;",
    "    indented code\n        more indented", "a_b_c __init__ self.__dict__",
    # URLs, paths, math
    "https://example.com/path?q=1&r=2#frag", "user.name+tag@example.co.uk", "C:\\Users\\x\\file.txt",
    "/usr/bin/env python3", "E = mc^2", "∑_{i=1}^n i² = n(n+1)/2", "x ≤ y ≥ z ≠ w",
    # special tokens of either model, whole and partial
    "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "a<|im_end|>b", "<|im_start|><|im_start|>",
    "<|im_start", "im_end|>", "<bos>", "<eos>", "<start_of_turn>user\nhi<end_of_turn>\n",
    "<end_of_turn", "<unused0>", "<mask>", "[multimodal]", "text <pad> text", "<repo_name>x<file_sep>y",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    # repetition and length
    "a" * 100, "ab" * 50, "the " * 30, "\n" * 40, "." * 64, "0" * 48,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.",
]

# Mixtures of the pieces above, to reach 200 strings.
rng = random.Random(12)
pieces = [t for t in texts if t and len(t) < 40]
seps = [" ", "", "\n", "  ", "\t", " \n", ", "]
while len(texts) < 200:
    n = rng.randint(2, 5)
    s = ""
    for i in range(n):
        s += rng.choice(pieces)
        if i + 1 < n:
            s += rng.choice(seps)
    if s not in texts:
        texts.append(s)
assert len(texts) == 200 and len(set(texts)) == 200, (len(texts), len(set(texts)))

def ids(model, text, no_bos):
    cmd = [tok_bin, "-m", model, "--stdin", "--no-escape", "--ids", "--log-disable"]
    if no_bos:
        cmd.append("--no-bos")
    r = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True)
    if r.returncode != 0:
        sys.exit(f"tokenizer-golden: error: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-500:]}")
    line = r.stdout.decode().strip().splitlines()[-1]
    return json.loads(line)

models = {}
for name, path in (("smollm2-135m", smol), ("gemma3-270m", gemma)):
    default, no_bos = [], []
    for t in texts:
        default.append(ids(path, t, False))
        no_bos.append(ids(path, t, True))
    models[name] = {"default": default, "no_bos": no_bos}
    print(f"tokenizer-golden: {name}: {sum(map(len, default))} tokens over {len(texts)} strings", file=sys.stderr)

# One id list per line keeps the file small and its diffs readable.
with open(out, "w", encoding="utf-8") as f:
    f.write("{\n")
    f.write('"generator": "scripts/tokenizer-golden.sh: llama.cpp 0.3.36 llama-tokenize --stdin --no-escape --ids (default, and --no-bos)",\n')
    f.write('"texts": [\n' + ",\n".join(json.dumps(t, ensure_ascii=False) for t in texts) + "\n],\n")
    f.write('"models": {\n')
    parts = []
    for name, m in models.items():
        body = []
        for key in ("default", "no_bos"):
            body.append(f'"{key}": [\n' + ",\n".join(json.dumps(x, separators=(",", ":")) for x in m[key]) + "\n]")
        parts.append(f'"{name}": {{\n' + ",\n".join(body) + "\n}")
    f.write(",\n".join(parts) + "\n}\n}\n")
print(f"tokenizer-golden: wrote {out}", file=sys.stderr)
PY
