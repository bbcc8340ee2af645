#!/usr/bin/env bash
# Cross-builds `outpost` for aarch64-unknown-linux-gnu and runs it under qemu-aarch64:
# a bundle made and signed by the host binary must verify on ARM, and a tampered copy must not.
#
# Run with: cross/aarch64-smoke.sh   (needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user)
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
cargo build --locked -p outpost-cli --bin outpost
cargo build --locked -p outpost-cli --bin outpost --target "$target"
dir="${CARGO_TARGET_DIR:-target}"
host_bin="$dir/debug/outpost"
arm_bin="$dir/$target/debug/outpost"
# ELF e_machine (bytes 18-19) is 0xb7 for aarch64.
[ "$(od -An -tx1 -j18 -N2 "$arm_bin" | tr -d ' ')" = b700 ] || { echo "not an aarch64 binary: $arm_bin" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '\0asm\1\0\0\0' > "$work/guest.wasm"
head -c 4096 /dev/zero > "$work/model.onnx"
cat > "$work/bundle.toml" <<'SPEC'
name = "smoke"
version = "1.0.0"
security_counter = 1
guest = "guest.wasm"
[[model]]
name = "m"
path = "model.onnx"
SPEC
"$host_bin" key generate --out "$work/signer" >/dev/null
"$host_bin" key trust "$work/signer.pub" --models smoke > "$work/trust.toml"
"$host_bin" bundle build "$work/bundle.toml" --out "$work/smoke.opb" >/dev/null
"$host_bin" bundle sign "$work/smoke.opb" --key "$work/signer.key" >/dev/null

run_arm() { qemu-aarch64 -L /usr/aarch64-linux-gnu "$arm_bin" "$@"; }
run_arm --version
run_arm bundle verify "$work/smoke.opb" --trust "$work/trust.toml"

cp "$work/smoke.opb" "$work/tampered.opb"
printf '\1' | dd of="$work/tampered.opb" bs=1 seek=2600 conv=notrunc status=none
if run_arm bundle verify "$work/tampered.opb" --trust "$work/trust.toml" 2>"$work/err"; then
  echo "aarch64: tampered bundle was accepted" >&2
  exit 1
fi
echo "aarch64 rejected the tampered bundle: $(head -1 "$work/err")"
echo "aarch64 smoke test passed"
