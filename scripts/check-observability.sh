#!/usr/bin/env bash
# Observability checks (grafana/README.md): the alert rules and their promtool unit tests,
# the exporter's scrape through `promtool check metrics` and a real Prometheus scraping it
# (the tests in actors/src/telemetry.rs, here made mandatory), and `systemd-analyze verify`
# of the unit in systemd/. Installs Debian's `prometheus` package (promtool + prometheus)
# and `systemd` (systemd-analyze) when missing; fast and idempotent once they are there.
# Run after ./scripts/test.sh (CI does), so the cargo targets are already built.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# apt-get install PACKAGE unless COMMAND is on PATH (updating the package lists only if the
# first attempt fails, e.g. on a fresh machine with none).
ensure() {
    local cmd="$1" pkg="$2"
    command -v "$cmd" >/dev/null && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "check-observability: $cmd is missing; install Debian's $pkg package" >&2
        exit 1
    fi
    echo "== installing $pkg (for $cmd)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$pkg" >"$work/apt.log" 2>&1 || {
        apt-get update -qq >>"$work/apt.log" 2>&1
        apt-get install -y -qq --no-install-recommends "$pkg" >>"$work/apt.log" 2>&1
    } || { cat "$work/apt.log" >&2; exit 1; }
    command -v "$cmd" >/dev/null
}

ensure promtool prometheus
ensure prometheus prometheus
ensure systemd-analyze systemd

echo "== promtool check rules"
promtool check rules grafana/alerts/dreamloop-rules.yml

echo "== promtool test rules"
promtool test rules grafana/alerts/dreamloop-rules.test.yml

echo "== exporter: scrape through promtool check metrics, and a real Prometheus"
DREAMLOOP_REQUIRE_PROMETHEUS=1 DREAMLOOP_SCRAPE_OUT="$work/scrape.txt" \
    cargo test -q -p dreamloop-actors --lib telemetry::
promtool check metrics <"$work/scrape.txt"
echo "scrape of $(grep -c '^# TYPE dreamloop_' "$work/scrape.txt") metric families passes promtool check metrics"

echo "== systemd-analyze verify"
# verify needs ExecStart's binary to exist: check a copy of the unit that runs the one built.
cargo build -q -p dreamloop-actors --bin dreamloop
sed "s#^ExecStart=/usr/local/bin/dreamloop #ExecStart=$target/debug/dreamloop #" \
    systemd/dreamloop.service >"$work/dreamloop.service"
grep -q "^ExecStart=$target/debug/dreamloop " "$work/dreamloop.service"
# verify exits 0 on some problems (an unknown Type=, say) and only prints them: any output fails.
if ! out="$(systemd-analyze verify "$work/dreamloop.service" 2>&1)" || [ -n "$out" ]; then
    echo "systemd-analyze verify systemd/dreamloop.service:" >&2
    echo "$out" >&2
    exit 1
fi
echo "systemd/dreamloop.service verifies"

echo "check-observability: all checks passed"
