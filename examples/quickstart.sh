#!/usr/bin/env bash
# Packaging walk-through as one command: build the guest, key, build, sign, trust, verify,
# inspect, install on a device, serve, query.
# Run with: examples/quickstart.sh   (from anywhere; files go to a temporary directory)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cargo build --quiet --manifest-path "$root/Cargo.toml" -p outpost-cli
cargo build --quiet --release --target wasm32-wasip2 --manifest-path "$root/examples/Cargo.toml" \
  --target-dir "$root/examples/target"
bin="${CARGO_TARGET_DIR:-$root/target}/debug/outpost"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
echo "working in $work"
cd "$work"
run() { echo "\$ outpost $*"; "$bin" "$@"; echo; }
run key generate --out signer
echo "\$ outpost key trust signer.pub --models digits > trust.toml"
"$bin" key trust signer.pub --models digits > trust.toml
run bundle build "$root/examples/digits/bundle.toml" --out digits.opb
run bundle sign digits.opb --key signer.key
run bundle verify digits.opb --trust trust.toml
run bundle inspect digits.opb
printf 'data_dir = "state"\nlisten = "127.0.0.1:18480"\ntrust_store = "trust.toml"\n' > device.toml
run device install digits.opb --config device.toml --activate
"$bin" device run --config device.toml 2>device.log &
for _ in $(seq 1 100); do curl -sf localhost:18480/v2/health/ready >/dev/null && break; sleep 0.1; done
echo "\$ curl -X POST localhost:18480/v2/models/digits/raw -H 'Content-Type: image/png' --data-binary @digit.png"
curl -s -X POST localhost:18480/v2/models/digits/raw -H 'Content-Type: image/png' \
  --data-binary @"$root/models/digits/samples/digit.png"
echo
