#!/usr/bin/env bash
# The whole test suite, as CI runs it. Needs only the Rust toolchain (and, for the tests
# that use them, what this script installs or fetches first).
set -euo pipefail
cd "$(dirname "$0")/.."
# The real model for tests/smollm2.rs, tests/gguf_smollm2.rs and actors/tests/smollm2_cli.rs
# (those tests skip themselves when it is absent, so the download must not fail quietly:
# with `set -e` a failed fetch stops the suite here).
./scripts/fetch-smollm2.sh --no-import
# No --all-targets: it would also run the benchmark binaries in test mode (they are
# compiled by clippy --all-targets in CI instead).
cargo test --workspace "$@"
