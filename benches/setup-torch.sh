#!/usr/bin/env bash
# Installs PyTorch + transformers into benches/.venv for the comparison in the model bench.
# Benchmarks only: tests and CI never need it. (~5.4 GB: torch's CPU execution needs the
# full wheel set; `--no-deps torch` fails to import, see the fixtures README.)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet "torch==2.*" "transformers>=4.45" safetensors
.venv/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
