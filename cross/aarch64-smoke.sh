#!/usr/bin/env bash
# Cross-builds `outpost` for aarch64-unknown-linux-gnu and runs it under qemu-aarch64:
#  1. a digits bundle built and signed on the host verifies on ARM, a tampered copy does not;
#  2. `outpost demo` on ARM (its fleet with the embedded broker deploying the example bundles to
#     its device; Cranelift compiling the guests for aarch64, tract running the models) serves
#     one inference of each example bundle, with the expected answer.
#
# Run with: cross/aarch64-smoke.sh   (needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross,
# qemu-user, curl, python3; .ci/run installs them)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

target=aarch64-unknown-linux-gnu
cargo build --locked -p outpost-cli --bin outpost
cargo build --locked -p outpost-cli --bin outpost --target "$target"
dir="${CARGO_TARGET_DIR:-$root/target}"
host_bin="$dir/debug/outpost"
arm_bin="$dir/$target/debug/outpost"
# ELF e_machine (bytes 18-19) is 0xb7 for aarch64.
[ "$(od -An -tx1 -j18 -N2 "$arm_bin" | tr -d ' ')" = b700 ] || { echo "not an aarch64 binary: $arm_bin" >&2; exit 1; }
run_arm() { qemu-aarch64 -L /usr/aarch64-linux-gnu "$arm_bin" "$@"; }

work=$(mktemp -d)
demo_pid=""
cleanup() { [ -n "$demo_pid" ] && kill "$demo_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

echo "== bundle verify on aarch64"
cat > "$work/bundle.toml" <<SPEC
name = "digits"
version = "1.0.0"
security_counter = 1
guest = "$dir/wasm-guests/wasm32-wasip2/release/digits_guest.wasm"
[[model]]
name = "classifier"
path = "$root/models/digits/digits.onnx"
SPEC
"$host_bin" key generate --out "$work/signer" >/dev/null
"$host_bin" key trust "$work/signer.pub" --models digits > "$work/trust.toml"
"$host_bin" bundle build "$work/bundle.toml" --out "$work/digits.opb" >/dev/null
"$host_bin" bundle sign "$work/digits.opb" --key "$work/signer.key" >/dev/null
run_arm --version
run_arm bundle verify "$work/digits.opb" --trust "$work/trust.toml"
cp "$work/digits.opb" "$work/tampered.opb"
printf '\1' | dd of="$work/tampered.opb" bs=1 seek=4000 conv=notrunc status=none
if run_arm bundle verify "$work/tampered.opb" --trust "$work/trust.toml" 2>"$work/err"; then
  echo "aarch64: tampered bundle was accepted" >&2
  exit 1
fi
echo "aarch64 rejected the tampered bundle: $(head -1 "$work/err")"

echo "== outpost demo on aarch64"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port); admin_port=$(free_port); fleet_port=$(free_port); mqtt_port=$(free_port)
start=$(date +%s)
OUTPOST_LOG=warn qemu-aarch64 -L /usr/aarch64-linux-gnu "$arm_bin" demo \
  --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" --data-dir "$work/demo" \
  --fleet-listen "127.0.0.1:$fleet_port" --mqtt-listen "127.0.0.1:$mqtt_port" \
  >"$work/demo.out" 2>"$work/demo.err" &
demo_pid=$!
url="http://127.0.0.1:$port"
# Ready once the fleet (on ARM too) has deployed both examples to the device.
ready() { curl -sf "$url/v2/models/digits/ready" >/dev/null 2>&1 && curl -sf "$url/v2/models/sensor-anomaly/ready" >/dev/null 2>&1; }
for _ in $(seq 1 600); do
  ready && break
  kill -0 "$demo_pid" 2>/dev/null || { echo "demo exited:" >&2; cat "$work/demo.err" >&2; exit 1; }
  sleep 1
done
ready || { echo "demo never became ready" >&2; cat "$work/demo.err" >&2; exit 1; }
echo "ready after $(( $(date +%s) - start ))s under emulation"

pixels=$(python3 -c 'import json; print(json.dumps(json.load(open("models/digits/expected.json"))["cases"][0]))')
request=$(python3 -c 'import json,sys; c=json.loads(sys.argv[1]); print(json.dumps({"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","data":c["pixels"]}]}))' "$pixels")
answer=$(curl -sf -X POST "$url/v2/models/digits/infer" -H 'Content-Type: application/json' -d "$request")
echo "aarch64 digits answer: $answer"
python3 - "$pixels" "$answer" <<'PY'
import json, sys
case, answer = json.loads(sys.argv[1]), json.loads(sys.argv[2])
outputs = {o["name"]: o for o in answer["outputs"]}
assert outputs["label"]["data"] == [case["label"]], (outputs["label"], case["label"])
for got, want in zip(outputs["probabilities"]["data"], case["probabilities"]):
    assert abs(got - want) <= 1e-4 * (1 + abs(want)), (got, want)
PY
readings=$(python3 -c 'import json; print(json.dumps({"readings": json.load(open("models/sensor/expected.json"))["cases"][1]["readings"]}))')
answer=$(curl -sf -X POST "$url/v2/models/sensor-anomaly/raw" -H 'Content-Type: application/json' -d "$readings")
echo "aarch64 sensor answer: $answer"
python3 - "$answer" <<'PY'
import json, sys
want = json.load(open("models/sensor/expected.json"))["cases"][1]["anomalies"]
assert json.loads(sys.argv[1])["anomalies"] == want, want
PY
echo "aarch64 smoke test passed"
