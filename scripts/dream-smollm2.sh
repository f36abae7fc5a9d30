#!/usr/bin/env bash
# Dream with a real model: llama.cpp's llama-server (built and cached by
# scripts/build-llama-server.sh) serving SmolLM2-135M-Instruct's GGUF (scripts/fetch-smollm2.sh)
# on 127.0.0.1, and `dreamloop dream` asking it for COUNT scenarios with the daemon's own
# checks. Writes every answer to OUT (JSONL) and prints the summary (BENCHMARKS.md,
# "Dreaming with llama-server").
#
# Usage: scripts/dream-smollm2.sh [COUNT] [OUT]     (default 1000, dreams-smollm2.jsonl)
# Env:   DREAMLOOP_BIN     the dreamloop binary (default: cargo's dev build, built if needed)
#        LLAMA_THREADS     llama-server's threads (default: all cores)
#        LLAMA_PARALLEL    llama-server's slots = dreamloop's requests in flight (default 2)
#        LLAMA_PORT        (default 18080)
#        DREAM_JSON_MODE   true (grammar-constrained JSON, the default) or false
set -euo pipefail
cd "$(dirname "$0")/.."
count="${1:-1000}"
out="${2:-dreams-smollm2.jsonl}"
port="${LLAMA_PORT:-18080}"
parallel="${LLAMA_PARALLEL:-2}"
threads="${LLAMA_THREADS:-$(nproc)}"

server_bin="$(scripts/build-llama-server.sh)"
./scripts/fetch-smollm2.sh --no-import >&2
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin="${DREAMLOOP_BIN:-}"
if [ -z "$bin" ]; then
    cargo build -p dreamloop-actors >&2
    bin="${CARGO_TARGET_DIR:-target}/debug/dreamloop"
fi

work="$(mktemp -d)"
# Each slot gets its share of the context: 2 exemplars and the instructions are ~1,500
# tokens, an answer at most max_tokens.
"$server_bin" -m "$gguf" --host 127.0.0.1 --port "$port" -np "$parallel" \
    -c $(( parallel * 4096 )) -t "$threads" --no-webui >"$work/server.log" 2>&1 &
server=$!
# The server's log (timings per request) is kept beside OUT.
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; cp "$work/server.log" "${out%.jsonl}.server.log"; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
    kill -0 $server 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.5
done
curl -fsS "http://127.0.0.1:$port/health" >/dev/null || { tail -20 "$work/server.log" >&2; exit 1; }

cp config/smollm2-cpu.toml "$work/dream.toml"
cat >>"$work/dream.toml" <<EOF

[dream]
server = "http://127.0.0.1:$port"
model = "SmolLM2-135M-Instruct-Q4_1"
concurrency = $parallel
max_tokens = 1024
timeout_seconds = 300
json_mode = ${DREAM_JSON_MODE:-true}
EOF
"$bin" dream --config "$work/dream.toml" --count "$count" --out "$out"
