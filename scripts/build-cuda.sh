#!/usr/bin/env bash
# Builds (compiles and links) the GPU binary offline and packs it for a GPU machine:
#   dist/dreamloop-cuda     stripped
#   dist/dreamloop-cuda.xz  what scripts/gpu-check.sh takes (the device tool carries 64 MiB)
# Needs what scripts/setup-cuda-build.sh lays out (it is run first; idempotent). No CUDA
# toolkit is needed: cudarc loads the driver's libcuda.so.1 at run time, and
# CUDARC_CUDA_VERSION pins the bindings (13000 for a CUDA 13 driver, 12080 for 12.8+).
#
# Environment: CARGO_TARGET_DIR as usual; CUDARC_CUDA_VERSION (default 13000).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-cuda-build.sh
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
started=$(date +%s)
cargo build -p dreamloop-actors --features cuda
target="${CARGO_TARGET_DIR:-target}"
mkdir -p dist
cp "$target/debug/dreamloop" dist/dreamloop-cuda
strip dist/dreamloop-cuda
xz -6 -T0 -c dist/dreamloop-cuda > dist/dreamloop-cuda.xz
echo "built in $(( $(date +%s) - started )) s: dist/dreamloop-cuda ($(du -h dist/dreamloop-cuda | cut -f1)), dist/dreamloop-cuda.xz ($(du -h dist/dreamloop-cuda.xz | cut -f1))"
# It starts, and knows its commands (no GPU is needed for that).
dist/dreamloop-cuda --version
dist/dreamloop-cuda device-check --help > /dev/null
