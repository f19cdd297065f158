#!/usr/bin/env bash
# Builds llama.cpp — the reference engine the generation benchmarks and golden
# checks compare against — from the source that the PyPI sdist of
# llama-cpp-python==0.3.36 carries in vendor/llama.cpp.
#
# Everything comes from PyPI: the sdist itself, and cmake, ninja and
# scikit-build-core (installed into a private venv). The build is cached in
# ${SNUG_CACHE_DIR:-$HOME/.cache/snug}/llama.cpp-0.3.36-noamx2; a second run with the
# binaries present does nothing. Prints the bin directory on stdout.
#
#   bash scripts/llama-cpp.sh            # build (about 10 minutes on 2 cores) or reuse
#   bash scripts/llama-cpp.sh --print    # print the bin directory; fail if not built
set -euo pipefail

VERSION="0.3.36"
# AMX is off: some VMs report AMX in cpuid but fault on its tile instructions
# (ggml then dies with SIGILL in its AMX matmul kernels). GGML_AMX_*=OFF is
# not enough with GGML_NATIVE=ON, whose -march=native turns the AMX kernels
# back on wherever cpuid lists AMX, so the compiler is also told -mno-amx-*
# (GCC keeps explicit ISA flags over -march). The suffix keeps this build
# apart from cached ones without these flags.
CACHE="${SNUG_CACHE_DIR:-$HOME/.cache/snug}/llama.cpp-$VERSION-noamx2"
BIN="$CACHE/build/bin"
TARGETS=(llama-bench llama-batched-bench llama-perplexity llama-tokenize llama-server llama-cli llama-simple
    llama-eval-callback)

die() { printf 'llama-cpp: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'llama-cpp: %s\n' "$*" >&2; }

built() {
    local t
    for t in llama-bench llama-batched-bench llama-perplexity llama-tokenize llama-server; do
        [[ -x "$BIN/$t" ]] || return 1
    done
}

if [[ "${1:-}" == "--print" ]]; then
    built || die "llama.cpp is not built in $CACHE; run 'bash scripts/llama-cpp.sh' first"
    echo "$BIN"
    exit 0
fi

if built; then
    say "llama.cpp $VERSION already built in $BIN"
    echo "$BIN"
    exit 0
fi

command -v python3 >/dev/null 2>&1 || die "python3 with pip is needed to fetch the sdist and the build tools from PyPI"
command -v c++ >/dev/null 2>&1 || die "a C++ compiler (g++) is needed to build llama.cpp"
mkdir -p "$CACHE" || die "cannot create $CACHE; set SNUG_CACHE_DIR to a writable directory"

VENV="$CACHE/venv"
if [[ ! -x "$VENV/bin/cmake" || ! -x "$VENV/bin/ninja" ]]; then
    say "installing cmake, ninja and scikit-build-core from PyPI into $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check cmake ninja scikit-build-core ||
        die "pip could not install cmake, ninja and scikit-build-core"
fi

SRC="$CACHE/src"
if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    say "downloading the llama-cpp-python==$VERSION sdist from PyPI"
    rm -rf "$CACHE/sdist" "$SRC"
    mkdir -p "$CACHE/sdist"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        --no-build-isolation "llama-cpp-python==$VERSION" -d "$CACHE/sdist" ||
        die "pip could not download the llama-cpp-python==$VERSION sdist"
    tarball=("$CACHE"/sdist/llama_cpp_python-*.tar.gz)
    [[ -f "${tarball[0]}" ]] || die "no sdist tarball in $CACHE/sdist"
    mkdir -p "$SRC"
    tar -xzf "${tarball[0]}" -C "$SRC" --strip-components=1 || die "could not unpack ${tarball[0]}"
fi

export PATH="$VENV/bin:$PATH"
say "configuring (GGML_NATIVE=ON, Release)"
cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF >"$CACHE/configure.log" 2>&1 ||
    die "cmake configure failed; see $CACHE/configure.log"
say "building ${TARGETS[*]} (about 10 minutes on 2 cores)"
cmake --build "$CACHE/build" -j"$(nproc)" --target "${TARGETS[@]}" >"$CACHE/build.log" 2>&1 ||
    die "the build failed; see $CACHE/build.log"
built || die "the build finished but the binaries are missing in $BIN"
say "built in $BIN"
echo "$BIN"
