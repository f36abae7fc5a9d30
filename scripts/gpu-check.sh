#!/usr/bin/env bash
# The GPU check: a `--features cuda` build of dreamloop on an NVIDIA card, with nothing but the
# driver installed and no network. Runs from the repository root with a stripped, compressed
# binary (build it with `scripts/build-cuda.sh`; it writes dist/dreamloop-cuda.xz) and the test
# fixtures, in under 10 minutes of wall time:
#
#   (a) fixtures: logits and log-probs of every dense and hybrid fixture model against
#       transformers' numbers, f32 and bf16, on the cuda device
#       (`dreamloop device-check fixtures`, tolerances in src/selfcheck.rs);
#   (b) step: SFT (4096 tokens) and DPO (a pair, 2 × 2048) steps of a model with the operator's
#       Qwen3.5-27B shapes (tests/fixtures/qwen3_5_27b/config.json), random bf16 weights drawn
#       on the device, through the real Trainer (bf16, recompute, logits chunk 1024,
#       APOLLO-Mini, embeddings and head frozen): step time, tokens/s, MFU against the card's
#       bf16 peak, peak device memory (nvidia-smi, sampled every 100 ms) beside
#       `dreamloop plan`'s prediction. As many of the 64 layers as the plan says fit the card;
#   (c) run: a short `dreamloop run` of `tiny-hybrid` in bf16 with backend = "cuda".
#
# One line per part, "PART <x> ok|FAILED: ...", and the tool's own SUMMARY lines; the details
# go to $OUT (default: a temp dir) when the device tool's $OUT is set.
#
#   scripts/gpu-check.sh [--dry-run] [--bin PATH]
#
# --dry-run (no GPU needed): prints every command the GPU run would run, then runs what runs
# without a device: (a) on the CPU, (b)'s plan and layer choice for a 141 GB and an 80 GB card
# plus a real step of a small 27B-shaped model on the CPU, (c) on the CPU, and the cuda
# refusal a machine without the driver must give (exit 78).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
bin=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --bin) bin="$2"; shift ;;
        *) echo "usage: $0 [--dry-run] [--bin PATH]" >&2; exit 2 ;;
    esac
    shift
done

out="${OUT:-$(mktemp -d)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ -z "$bin" ]]; then
    if [[ -f dist/dreamloop-cuda.xz ]]; then bin=dist/dreamloop-cuda.xz
    elif [[ -x dist/dreamloop-cuda ]]; then bin=dist/dreamloop-cuda
    else bin=target/debug/dreamloop
    fi
fi
if [[ "$bin" == *.xz ]]; then
    xz -dc "$bin" > "$work/dreamloop" && chmod +x "$work/dreamloop" || { echo "cannot unpack $bin" >&2; exit 1; }
    bin="$work/dreamloop"
fi
[[ -x "$bin" ]] || { echo "no dreamloop binary at $bin (build one: scripts/build-cuda.sh)" >&2; exit 1; }
echo "binary: $bin ($("$bin" --version 2>&1))"

failures=0
part() { # part NAME STATUS DETAIL
    echo "PART $1 $2: $3"
    [[ "$2" == ok ]] || failures=$((failures + 1))
}

# (c)'s config: tiny-hybrid in bf16, 8 steps, an evaluation and a checkpoint every 4.
run_config() { # run_config BACKEND STATE
    cat <<EOF
state_dir = "$2"
metrics_addr = "127.0.0.1:0"
phase = "sft"
[model]
spec = "tiny-hybrid"
backend = "$1"
dtype = "bf16"
[train]
lr = 2e-5
warmup_steps = 0
schedule = "constant"
batch_size = 2
max_grad_norm = 1.0
beta = 0.01
[train.optimizer.adamw]
weight_decay = 0.0
[data]
scenarios_dir = "$PWD/scenarios"
replay_ratio = 0.25
accept_share = 0.5
general_weights = [0.25, 0.25, 0.2, 0.3]
chunk_words = [8, 24]
seed = 0
[eval]
every_n_steps = 4
probe_samples = 1
general_items = 2
max_heldout_texts = 1
heldout_max_bytes = 512
seed = 0
[rollback]
[checkpoint]
every_n_steps = 4
keep_last = 2
[queues]
examples = 8
trainer = 1
[supervisor]
max_restarts = 3
window_seconds = 600
call_timeout_seconds = 300
status_every_seconds = 1
# The policy's own replies (greedy generation with the trainer's weights on this backend)
# before every 4th step.
[on_policy]
every_n_steps = 4
samples = 2
max_new_tokens = 16
EOF
}

# (c): the daemon for 8 steps; ok when it exits 0 at step 8 with a checkpoint.
daemon_part() { # daemon_part BACKEND
    local state="$work/state-$1" cfg="$work/run-$1.toml"
    run_config "$1" "$state" > "$cfg"
    local started=$SECONDS
    timeout 150 "$bin" run --config "$cfg" --max-steps 8 > "$out/run-$1.log" 2>&1
    local rc=$?
    local step
    step=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$state/status.json" 2>/dev/null | head -1)
    if [[ $rc -eq 0 && "$step" == 8 && -e "$state/checkpoints/LATEST" ]]; then
        part c ok "dreamloop run tiny-hybrid bf16 backend=$1: 8 steps, exit 0, LATEST checkpoint, $((SECONDS - started)) s"
    else
        part c FAILED "dreamloop run backend=$1: exit $rc, status step '${step:-none}' (log: $out/run-$1.log)"
        tail -5 "$out/run-$1.log"
    fi
}

if [[ $dry -eq 1 ]]; then
    echo "== dry run: the GPU run would do"
    cat <<EOF
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  (a) $bin device-check fixtures --backend cuda --dir tests/fixtures/models
  (b) $bin device-check step --backend cuda --model tests/fixtures/qwen3_5_27b --phase sft --seq-len 4096 --device-memory <card>MiB
      $bin device-check step --backend cuda --model tests/fixtures/qwen3_5_27b --phase dpo --seq-len 2048 --device-memory <card>MiB
      each beside nvidia-smi --query-gpu=memory.used -lms 100 (peak minus the idle baseline)
  (c) $bin run --config <tiny-hybrid, bf16, backend = "cuda"> --max-steps 8
EOF
    echo "== dry run: what runs without a device"
    if timeout 300 "$bin" device-check fixtures --backend cpu --dir tests/fixtures/models > "$out/fixtures-cpu.jsonl" 2>&1; then
        part a ok "$(grep -h SUMMARY "$out/fixtures-cpu.jsonl" | tr '\n' ' ')"
    else
        part a FAILED "$(grep -h SUMMARY "$out/fixtures-cpu.jsonl" | tr '\n' ' ') (details: $out/fixtures-cpu.jsonl)"
    fi
    plans=""
    for mem in 141GB 80GiB; do
        for phase in "sft 4096" "dpo 2048"; do
            set -- $phase
            line=$("$bin" device-check step --backend cuda --model tests/fixtures/qwen3_5_27b \
                --phase "$1" --seq-len "$2" --device-memory "$mem" --plan-only 2>/dev/null | grep SUMMARY)
            [[ -n "$line" ]] || { part b FAILED "plan for $1 on $mem"; continue; }
            echo "$line"
            plans+="$1@$mem: $(sed -n 's/.*: \([0-9]*\/64\) layers.*/\1/p' <<< "$line") layers; "
        done
    done
    if timeout 400 "$bin" device-check step --backend cpu --model tests/fixtures/qwen3_5_27b_shape_small \
        --phase sft --seq-len 128 --steps 2 > "$out/step-cpu.jsonl" 2>"$out/step-cpu.err"; then
        part b ok "${plans}small 27B-shaped step on the CPU: $(grep SUMMARY "$out/step-cpu.jsonl" | cut -d: -f2-)"
    else
        part b FAILED "small step on the CPU: $(tail -2 "$out/step-cpu.err")"
    fi
    daemon_part cpu
    # Without the NVIDIA driver (or in a CPU-only build) backend = "cuda" is refused up front.
    run_config cuda "$work/state-refused" > "$work/refused.toml"
    "$bin" validate-config "$work/refused.toml" > "$out/refused.log" 2>&1
    rc=$?
    if [[ $rc -eq 78 ]] && grep -q "model.backend" "$out/refused.log"; then
        part refusal ok "validate-config with backend = \"cuda\" here: exit 78, $(grep -m1 -o 'model.backend.*' "$out/refused.log" | cut -c1-160)"
    else
        part refusal FAILED "validate-config with backend = \"cuda\": exit $rc (log: $out/refused.log)"
    fi
    echo "== dry run done: $failures part(s) failed"
    exit $(( failures > 0 ))
fi

echo "== GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | tr -d ' ')
[[ "$total_mib" =~ ^[0-9]+$ ]] || { echo "nvidia-smi gives no memory.total ('$total_mib')" >&2; exit 1; }

# cubecl's LLVM path links exp/log/tanh... from libdevice.10.bc, a CUDA-toolkit file (not the
# driver's), looked up under these prefixes; without it kernels using them fail to compile.
libdevice=""
for p in "${CUDA_PATH:-}" /usr/local/cuda /opt/cuda /usr/lib/cuda /usr; do
    [[ -n "$p" && -f "$p/nvvm/libdevice/libdevice.10.bc" ]] && { libdevice="$p/nvvm/libdevice/libdevice.10.bc"; break; }
done
echo "libdevice: ${libdevice:-NOT FOUND (set CUDA_PATH to a CUDA toolkit or a copy of its nvvm/libdevice)}"

# (a)
started=$SECONDS
if timeout 120 "$bin" device-check fixtures --backend cuda --dir tests/fixtures/models > "$out/fixtures-cuda.jsonl" 2>&1; then
    part a ok "$(grep -h SUMMARY "$out/fixtures-cuda.jsonl" | tr '\n' ' ')($((SECONDS - started)) s)"
else
    part a FAILED "$(grep -h SUMMARY "$out/fixtures-cuda.jsonl" | tr '\n' ' ') (details: $out/fixtures-cuda.jsonl; $((SECONDS - started)) s)"
    tail -3 "$out/fixtures-cuda.jsonl"
fi

# (b)
step_part() { # step_part PHASE SEQ LIMIT
    local mem="$out/mem-$1.csv" idle peak
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1 | tr -d ' ')
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" 2>/dev/null &
    local watcher=$!
    timeout "$3" "$bin" device-check step --backend cuda --model tests/fixtures/qwen3_5_27b \
        --phase "$1" --seq-len "$2" --steps 3 --device-memory "${total_mib}MiB" \
        > "$out/step-$1.jsonl" 2> "$out/step-$1.err"
    local rc=$?
    kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null
    peak=$(sort -n "$mem" | tail -1)
    local used_gb
    used_gb=$(awk -v p="${peak:-0}" -v i="${idle:-0}" 'BEGIN { printf "%.2f", (p - i) * 1048576 / 1e9 }')
    if [[ $rc -eq 0 ]]; then
        part b ok "$(grep SUMMARY "$out/step-$1.jsonl" | cut -d: -f2-); measured peak device memory ${used_gb} GB (nvidia-smi, above idle)"
    else
        part b FAILED "$1: exit $rc, measured peak ${used_gb} GB; $(tail -2 "$out/step-$1.err" | tr '\n' ' ')"
    fi
}
step_part sft 4096 200
step_part dpo 2048 170

# (c)
daemon_part cuda

echo "== GPU check done: $failures part(s) failed"
exit $(( failures > 0 ))
