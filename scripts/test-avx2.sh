#!/usr/bin/env bash
# The core crate's tests on AVX2-only kernels, whatever CPU this machine has.
#
# burn-flex (through macerator) and gemm pick their SIMD kernels at run time from CPUID, and
# none of them has a switch to forbid AVX-512. qemu's user-mode emulator can present a CPU
# without it: `qemu-x86_64 -cpu Haswell` reports AVX2 and FMA but no AVX-512, so every
# kernel takes its AVX2 path. Each test binary of the core crate (`cargo test -p dreamloop`:
# the unit tests and tests/*.rs, where the numbers are compared with transformers'
# references) is built natively and run under the emulator.
#
# The training trajectories against PyTorch (actors/tests/train_cli.rs, where an AVX-512
# difference once showed) run the `dreamloop` binary: that test runs natively with
# `DREAMLOOP_BIN` pointing at a wrapper that starts the binary under the emulator. The other
# daemon tests are left out (they test the runtime, not the arithmetic).
#
# Emulation is slow (TCG translates every instruction): expect many times the native time.
#
# Usage: scripts/test-avx2.sh [TEST-NAME-FILTER]   (needs Debian's qemu-user)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-x86_64 > /dev/null; then
    echo "qemu-x86_64 not found: install Debian's qemu-user (apt-get install qemu-user)" >&2
    exit 2
fi
# The emulated CPU must really lack AVX-512 and have AVX2 (checked, not assumed).
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
cat > "$probe/cpu.rs" <<'EOF'
fn main() {
    let (avx2, fma, avx512) = (
        is_x86_feature_detected!("avx2"),
        is_x86_feature_detected!("fma"),
        is_x86_feature_detected!("avx512f"),
    );
    println!("avx2={avx2} fma={fma} avx512f={avx512}");
    std::process::exit(if avx2 && fma && !avx512 { 0 } else { 1 });
}
EOF
rustc -O -o "$probe/cpu" "$probe/cpu.rs"
echo "native:   $("$probe/cpu" || true)"
echo "emulated: $(qemu-x86_64 -cpu Haswell "$probe/cpu" 2> /dev/null)"

./scripts/fetch-smollm2.sh --no-import
binaries=$(cargo test -p dreamloop --no-run --message-format=json 2> /dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])
')
status=0
for bin in $binaries; do
    echo "== $(basename "$bin") under qemu-x86_64 -cpu Haswell"
    # The test binaries find tests/fixtures relative to the crate root, as under cargo.
    if ! qemu-x86_64 -cpu Haswell "$bin" ${1:+"$1"} 2> >(grep -v '^qemu-x86_64: warning' >&2); then
        status=1
    fi
done
echo "== train_cli with dreamloop under qemu-x86_64 -cpu Haswell"
artifacts=$(cargo test -p dreamloop-actors --test train_cli --no-run --message-format=json 2> /dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        if m["target"]["name"] in ("train_cli", "dreamloop"):
            print(m["target"]["name"], m["executable"])
')
test_bin=$(awk '$1 == "train_cli" {print $2}' <<< "$artifacts")
real_bin=$(awk '$1 == "dreamloop" {print $2}' <<< "$artifacts")
real_bin=${real_bin:-${CARGO_TARGET_DIR:-target}/debug/dreamloop}
printf '#!/usr/bin/env bash\nexec qemu-x86_64 -cpu Haswell %q "$@" 2> >(grep -v "^qemu-x86_64: warning" >&2)\n' \
    "$real_bin" > "$probe/dreamloop"
chmod +x "$probe/dreamloop"
if ! DREAMLOOP_BIN="$probe/dreamloop" "$test_bin" ${1:+"$1"}; then
    status=1
fi
exit $status
