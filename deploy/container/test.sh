#!/usr/bin/env bash
# Builds the fleet image with deploy/container/build.sh and runs it with podman:
#  - started without its token secret, it stops with an error naming the file;
#  - with it, on a read-only root filesystem as user 65532, /healthz answers, the API refuses a
#    request without the token and answers one with it, and `podman stop` ends it cleanly.
# Says plainly, and exits 0 with a "skipped" line, when podman cannot build or run here
# (exit 1 instead with OUTPOST_REQUIRE_PODMAN=1).
#
#   deploy/container/test.sh [BINARY]    (default: the dev build, as build.sh --allow-dynamic)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
target_dir="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outpost/target}"
binary=${1:-$target_dir/debug/outpost}

skip() {
  echo "container test skipped: $*"
  [ "${OUTPOST_REQUIRE_PODMAN:-0}" = 1 ] && exit 1
  exit 0
}
[ -x "$binary" ] || skip "no outpost binary at $binary"
command -v podman >/dev/null 2>&1 || skip "podman is not installed (Debian: apt-get install podman buildah)"

tag="test-$$"
name="localhost/outpost-fleet-test"
ctr="outpost-fleet-test-$$" vol="outpost-fleet-test-$$" secret="outpost-api-token-$$"
work=$(mktemp -d "${TMPDIR:-/tmp}/outpost-container-test.XXXXXX")
image=""
cleanup() {
  # -v: the anonymous volume the image's VOLUME gives a container goes with it.
  podman rm -f -v "$ctr" "$ctr-nosecret" >/dev/null 2>&1 || true
  podman volume rm -f "$vol" >/dev/null 2>&1 || true
  podman secret rm "$secret" >/dev/null 2>&1 || true
  [ -z "$image" ] || podman rmi -f "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }

echo "== build (deploy/container/build.sh fleet $binary)"
set +e
"$here/build.sh" --allow-dynamic --name "$name" --version "$tag" fleet "$binary" > "$work/build.out" 2> "$work/build.err"
rc=$?
set -e
if [ "$rc" = 3 ]; then skip "$(grep -m1 'cannot build' "$work/build.err"): $(grep -m1 -i error "$work/build.err" || true)"; fi
[ "$rc" = 0 ] || { cat "$work/build.err"; echo "FAILED: build.sh exited $rc"; exit 1; }
image=$(tail -1 "$work/build.out")
ok "built $image"
labels=$(podman image inspect "$image" --format '{{index .Config.Labels "org.opencontainers.image.licenses"}} {{index .Config.Labels "org.opencontainers.image.source"}} {{.Config.User}}')
if [ "$labels" = "Apache-2.0 https://github.com/outpost-edge/outpost 65532:65532" ]; then ok "labels and user: $labels"; else bad "labels and user: $labels"; fi

# How podman runs containers here. Its defaults first; in a sandbox that forbids raising
# rlimits or has hybrid cgroups (crun refuses those), runc with the host's own limits.
run_modes=("" "--runtime runc")
ulimits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
mode="" extra=()
for m in "${run_modes[@]}"; do
  e=(); [ -z "$m" ] || e=("${ulimits[@]}")
  # shellcheck disable=SC2086 # $m is empty or two words
  if podman $m run --rm "${e[@]}" "$image" --version > "$work/probe.out" 2> "$work/probe.err"; then
    mode=$m extra=("${e[@]}"); break
  fi
  echo "podman ${m:-(defaults)} cannot run a container here: $(grep -v -i systemd "$work/probe.err" | tail -1)"
done
if [ -z "$mode" ] && ! grep -q outpost "$work/probe.out" 2>/dev/null; then
  skip "podman cannot run containers here (last error above)"
fi
echo "podman runs containers here${mode:+ with $mode} ${extra[*]}"
pod() {
  # shellcheck disable=SC2086 # $mode is empty or two words
  podman $mode "$@"
}

echo "== without its token secret"
set +e
pod run --name "$ctr-nosecret" --read-only "${extra[@]}" "$image" > "$work/nosecret.out" 2>&1
rc=$?
set -e
if [ "$rc" != 0 ] && grep -q "cannot read \`/run/secrets/outpost-api-token\`" "$work/nosecret.out"; then
  ok "exits $rc: $(grep -m1 'cannot read' "$work/nosecret.out")"
else
  bad "without the token: exit $rc, output: $(tail -3 "$work/nosecret.out")"
fi

echo "== with it"
openssl rand -hex 32 > "$work/token" 2>/dev/null || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"
podman secret create "$secret" "$work/token" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# /run/secrets is a tmpfs: on a read-only root the runtime cannot create the secret's mount point.
pod run -d --name "$ctr" --read-only --tmpfs /run/secrets "${extra[@]}" \
  --secret "$secret,target=outpost-api-token" -v "$vol:/var/lib/outpost-fleet" \
  -p "127.0.0.1:$port:7878" "$image" > /dev/null 2> "$work/run.err" ||
  { cat "$work/run.err"; echo "FAILED: podman run"; exit 1; }
up=0
for _ in $(seq 1 60); do
  if curl -sf -m 2 "http://127.0.0.1:$port/healthz" > "$work/health" 2>/dev/null; then up=1; break; fi
  sleep 0.5
done
if [ "$up" = 1 ]; then ok "/healthz answers: $(cat "$work/health")"; else bad "/healthz never answered: $(pod logs "$ctr" 2>&1 | tail -3)"; fi
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/api/v1/fleet")
if [ "$code" = 401 ]; then ok "API without the token: 401"; else bad "API without the token: $code"; fi
if curl -sf -H "Authorization: Bearer $(cat "$work/token")" "http://127.0.0.1:$port/api/v1/fleet" > "$work/fleet.json"; then
  ok "API with the token: $(head -c 90 "$work/fleet.json")..."
else
  bad "API with the token"
fi
ro=$(pod inspect "$ctr" --format '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}')
if [ "$ro" = "true 65532:65532" ]; then ok "read-only root, user 65532: $ro"; else bad "read-only root, user 65532: $ro"; fi
if pod healthcheck run "$ctr" > "$work/hc" 2>&1; then
  ok "HEALTHCHECK (outpost health) passes"
else
  echo "note: HEALTHCHECK reports $(grep -v -i systemd "$work/hc" | tail -1): it runs \`outpost health --url\`, which this binary $("$binary" health --help >/dev/null 2>&1 && echo has || echo 'does not have yet')"
fi
pod stop -t 10 "$ctr" > /dev/null 2>&1 || true
status=$(pod inspect "$ctr" --format '{{.State.ExitCode}}')
if [ "$status" = 0 ]; then ok "podman stop: exit 0 ($(pod logs "$ctr" 2>&1 | grep -v -i systemd | tail -1 | cut -c1-80))"; else bad "podman stop: exit $status"; fi

echo
echo "container: $passed passed, $failed failed"
[ "$failed" = 0 ]
