#!/usr/bin/env bash
# The whole test suite, as CI runs it. Needs only the Rust toolchain (and, for the tests
# that use them, what this script installs or fetches first).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets "$@"
