#!/usr/bin/env bash
# The README's quick start as one command: key, build, sign, trust, verify, inspect.
# Run with: examples/quickstart.sh  (from anywhere; files go to a temporary directory)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cargo build --quiet --manifest-path "$root/Cargo.toml" -p outpost-cli
bin="${CARGO_TARGET_DIR:-$root/target}/debug/outpost"
work="$(mktemp -d)"
echo "working in $work"
cd "$work"
run() { echo "\$ outpost $*"; "$bin" "$@"; echo; }
run key generate --out signer
echo "\$ outpost key trust signer.pub --models hello > trust.toml"
"$bin" key trust signer.pub --models hello > trust.toml
run bundle build "$root/examples/hello/bundle.toml" --out hello.opb
run bundle sign hello.opb --key signer.key
run bundle verify hello.opb --trust trust.toml
run bundle inspect hello.opb
