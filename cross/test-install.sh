#!/usr/bin/env bash
# shellcheck disable=SC2016 # the checks pass paths to sh -c '...' sh ARGS: the quotes are meant
# Tests cross/install.sh by installing a release into temporary root filesystems (--root) and
# checking every file, its owner and mode, the enable link, the user entries and the config;
# then idempotence, a tampered release, bad flags and configs, --dry-run, --uninstall and
# --purge. Nothing outside a temporary directory is written.
#
# The release's binary is the dev build (OUTPOST_BIN, else $CARGO_TARGET_DIR/debug/outpost, else
# target/debug/outpost) when it runs here, else a stub script: the output says which. As root
# every owner is checked; unprivileged, owners are skipped (the output says so) and the rest runs.
#
# Run with: cross/test-install.sh   (needs bash, coreutils, tar, python3; .ci/check-deploy runs it)
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
install_sh="$root_dir/cross/install.sh"

work=$(mktemp -d "${TMPDIR:-/tmp}/outpost-test-install.XXXXXX")
trap 'rm -rf "$work"' EXIT

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }
check() { # check DESCRIPTION COMMAND...
  local desc=$1; shift
  if "$@"; then ok "$desc"; else bad "$desc"; fi
}
note() { echo "note: $*"; }

as_root=0; [ "$(id -u)" -eq 0 ] && as_root=1
[ "$as_root" = 1 ] || note "not root: owner checks are skipped (install.sh cannot chown); modes and contents are checked"

# --- the release's binary ----------------------------------------------------------------------
target_dir="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outpost/target}"
dev_bin=""
for b in "${OUTPOST_BIN:-}" "$target_dir/debug/outpost" "$root_dir/target/debug/outpost"; do
  if [ -n "$b" ] && [ -x "$b" ] && "$b" --version >/dev/null 2>&1; then dev_bin=$b; break; fi
done
stub="$work/stub-outpost"
cat > "$stub" <<'STUB'
#!/bin/sh
# Stand-in for outpost in cross/test-install.sh: --version, device default-config, and
# device check-config (refuses a file Python's tomllib cannot read, or with a key `surprise`).
case "$1 $2" in
  "--version "*) echo "outpost 0.0.0-stub" ;;
  "device default-config") echo 'data_dir = "/var/lib/outpost"' ;;
  "device check-config")
    [ "$3" = --help ] && exit 0
    python3 -c 'import sys, tomllib; d = tomllib.load(open(sys.argv[1], "rb")); sys.exit("unknown field surprise" if "surprise" in d else 0)' "$4" ;;
  *) echo "stub: unsupported: $*" >&2; exit 2 ;;
esac
STUB
chmod 0755 "$stub"
if [ -n "$dev_bin" ]; then
  bin=$dev_bin
  note "release binary: the dev build $bin ($("$bin" --version))"
else
  bin=$stub
  note "release binary: a stub script (no dev build of outpost runs here)"
fi
has() { "$1" "$2" "$3" --help >/dev/null 2>&1; }
can_sign=0
if has "$bin" release sign && has "$bin" release verify; then can_sign=1; fi
[ "$can_sign" = 1 ] || note "this outpost has no \`release sign/verify\`: SHA256SUMS is written with sha256sum, the signature checks are skipped"
has_check=0
if has "$bin" device check-config; then has_check=1; fi
[ "$has_check" = 1 ] || note "this outpost has no \`device check-config\`: install.sh warns and skips it; the bad-config case runs with the stub"

# --- a release ---------------------------------------------------------------------------------
make_release() { # make_release DIR BINARY
  local dir=$1
  mkdir -p "$dir"
  cp "$2" "$dir/outpost"
  cp "$root_dir/cross/outpost-device.service" "$dir/"
  if "$2" device default-config > "$dir/device.toml" 2>/dev/null; then :; else echo '# default config' > "$dir/device.toml"; fi
  if [ -f "$root_dir/LICENSE" ]; then cp "$root_dir/LICENSE" "$dir/"; else echo "Apache-2.0 (test release)" > "$dir/LICENSE"; fi
  if [ "$can_sign" = 1 ]; then
    "$bin" release sign --key-file "$work/release.key" "$dir" >/dev/null
  else
    (cd "$dir" && sha256sum outpost outpost-device.service device.toml LICENSE > SHA256SUMS && echo "unsigned test release" > SHA256SUMS.sig)
  fi
}
key_hex() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["public_key"])' "$1"; }
keygen_bin=$bin; [ -n "$dev_bin" ] || keygen_bin=""
if [ -n "$keygen_bin" ]; then
  "$keygen_bin" key generate --out "$work/release" >/dev/null
  "$keygen_bin" key generate --out "$work/fleet" >/dev/null
  "$keygen_bin" key generate --out "$work/other" >/dev/null
  release_key=$(key_hex "$work/release.pub") other_key=$(key_hex "$work/other.pub")
else
  printf '{"type": "outpost-ed25519-public-key", "key_id": "0", "public_key": "%s"}\n' \
    "$(printf 'a%.0s' $(seq 64))" > "$work/fleet.pub"
  release_key="" other_key=""
fi
rel="$work/outpost-0.0.0-test"
make_release "$rel" "$bin"
tar -C "$work" -czf "$work/outpost-0.0.0-test.tar.gz" "$(basename "$rel")"
tarball="$work/outpost-0.0.0-test.tar.gz"
echo "# no signer trusted yet" > "$work/trust.toml"
echo "s3cret-password" > "$work/mqtt-password"

new_root() { # new_root DIR: an image root with a few system users (gid 999 taken)
  mkdir -p "$1/etc"
  printf 'root:x:0:0:root:/root:/bin/sh\nmessagebus:x:100:101::/nonexistent:/usr/sbin/nologin\n' > "$1/etc/passwd"
  printf 'root:x:0:\nmessagebus:x:101:\nsystemd-journal:x:999:\n' > "$1/etc/group"
  printf 'root:*:19000:0:99999:7:::\nmessagebus:!:19000::::::\n' > "$1/etc/shadow"
  printf 'root:*::\nmessagebus:!::\nsystemd-journal:!::\n' > "$1/etc/gshadow"
  chmod 0640 "$1/etc/shadow" "$1/etc/gshadow"
}
# A listing of a tree: type, mode, owner, link target, and a hash of each file's content.
listing() {
  (cd "$1" && find . -printf '%y %m %U:%G %p %l\n' | sort) > "$2"
  (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) >> "$2"
}
unchanged() { listing "$1" "$work/after.list"; cmp -s "$2" "$work/after.list" || { diff "$2" "$work/after.list" | head -5; return 1; }; }
# stat as "TYPE MODE UID:GID"; the owner part dropped when not root.
st() {
  if [ "$as_root" = 1 ]; then stat -c '%F %a %u:%g' "$1"; else stat -c '%F %a' "$1"; fi
}
want() { # want PATH "TYPE MODE" UID:GID
  if [ "$as_root" = 1 ]; then echo "$2 $3"; else echo "$2"; fi
}
is_meta() { # is_meta ROOT PATH "TYPE MODE" UID:GID
  local got exp
  got=$(st "$1$2" 2>/dev/null || echo missing)
  exp=$(want "$2" "$3" "$4")
  [ "$got" = "$exp" ] || { echo "  $2: got '$got', want '$exp'"; return 1; }
}
run_install() { # run_install LOG ARGS...: install.sh, its output to LOG; returns its status
  local log=$1; shift
  sh "$install_sh" "$@" > "$log" 2>&1
}

fleet_args=(--broker mqtt://fleet.example:1883 --fleet-key-file "$work/fleet.pub" --device-id edge-0001
  --tag lab --tag site-b --listen 0.0.0.0:8080 --mqtt-password-file "$work/mqtt-password" --trust "$work/trust.toml")
sig_args=(); [ "$can_sign" = 1 ] && sig_args=(--release-key "$release_key" --verifier "$bin")

# --- 1. install into a fresh root --------------------------------------------------------------
echo "== install into a temporary root"
r="$work/root"
new_root "$r"
cp "$r/etc/passwd" "$work/passwd.orig"; cp "$r/etc/group" "$work/group.orig"
if run_install "$work/install1.log" --root "$r" "${sig_args[@]}" "${fleet_args[@]}" "$tarball"; then
  ok "install.sh --root exits 0"
else
  bad "install.sh --root exits 0"; cat "$work/install1.log"
fi
uid=$(awk -F: '$1 == "outpost" { print $3 }' "$r/etc/passwd")
gid=$(awk -F: '$1 == "outpost" { print $3 }' "$r/etc/group")
check "user outpost in etc/passwd (uid $uid, first free system id below 999)" \
  grep -qx "outpost:x:998:998:Outpost device runtime:/var/lib/outpost:/usr/sbin/nologin" "$r/etc/passwd"
check "group outpost in etc/group (gid $gid)" grep -qx "outpost:x:998:" "$r/etc/group"
check "locked password in etc/shadow" grep -q '^outpost:!:[0-9]*::::::$' "$r/etc/shadow"
check "group in etc/gshadow" grep -qx 'outpost:!::' "$r/etc/gshadow"
check "etc/shadow keeps mode 0640" is_meta "$r" /etc/shadow "regular file 640" 0:0
check "/usr/local/bin/outpost 0755 root:root" is_meta "$r" /usr/local/bin/outpost "regular file 755" 0:0
check "/usr/local/bin/outpost is the release's binary" cmp -s "$rel/outpost" "$r/usr/local/bin/outpost"
check "/etc/outpost 0750 root:outpost" is_meta "$r" /etc/outpost "directory 750" "0:$gid"
check "/var/lib/outpost 0750 outpost:outpost" is_meta "$r" /var/lib/outpost "directory 750" "$uid:$gid"
for f in device.toml trust.toml fleet.pub mqtt-password; do
  check "/etc/outpost/$f 0640 root:outpost" is_meta "$r" "/etc/outpost/$f" "regular file 640" "0:$gid"
done
check "trust.toml, fleet.pub, mqtt-password are the given files" \
  sh -c 'cmp -s "$1/trust.toml" "$2/etc/outpost/trust.toml" && cmp -s "$1/fleet.pub" "$2/etc/outpost/fleet.pub" && cmp -s "$1/mqtt-password" "$2/etc/outpost/mqtt-password"' sh "$work" "$r"
check "/etc/systemd/system/outpost-device.service 0644 root:root" \
  is_meta "$r" /etc/systemd/system/outpost-device.service "regular file 644" 0:0
check "the unit is the release's" cmp -s "$rel/outpost-device.service" "$r/etc/systemd/system/outpost-device.service"
link="$r/etc/systemd/system/multi-user.target.wants/outpost-device.service"
check "enabled: multi-user.target.wants link -> /etc/systemd/system/outpost-device.service" \
  test "$(readlink "$link")" = /etc/systemd/system/outpost-device.service
conf="$r/etc/outpost/device.toml"
for line in 'data_dir = "/var/lib/outpost"' 'listen = "0.0.0.0:8080"' 'trust_store = "trust.toml"' '[fleet]' \
  'broker = "mqtt://fleet.example:1883"' 'fleet_key_file = "fleet.pub"' 'device_id = "edge-0001"' \
  'tags = ["lab", "site-b"]' 'username = "edge-0001"' 'password_file = "mqtt-password"'; do
  check "device.toml has: $line" grep -qxF "$line" "$conf"
done
# The written config as the runtime reads it: check-config where the binary has it, else
# `device status` on a copy whose data_dir points into the temporary directory (it loads and
# validates the whole config, fleet key file and password file included).
if [ -n "$dev_bin" ]; then
  if [ "$has_check" = 1 ]; then
    check "outpost device check-config accepts the written config" "$bin" device check-config --config "$conf"
  else
    mkdir -p "$work/cfg"
    cp "$r/etc/outpost/"* "$work/cfg/"
    sed -i "s#^data_dir = .*#data_dir = \"$work/cfg/data\"#" "$work/cfg/device.toml"
    check "the runtime loads the written config (outpost device status on a copy)" \
      sh -c '"$1" device status --config "$2" >/dev/null' sh "$bin" "$work/cfg/device.toml"
  fi
fi
if [ "$can_sign" = 1 ]; then
  check "the signature was verified" grep -q "signature: SHA256SUMS.sig verifies" "$work/install1.log"
fi

# --- 2. idempotence ----------------------------------------------------------------------------
echo "== a second run changes nothing"
listing "$r" "$work/first.list"
run_install "$work/install2.log" --root "$r" "${sig_args[@]}" "${fleet_args[@]}" "$tarball" || { bad "second install exits 0"; cat "$work/install2.log"; }
check "second run: same files, modes, owners, links and hashes" unchanged "$r" "$work/first.list"
check "second run: the binary and unit are reported up to date" \
  sh -c 'grep -q "/usr/local/bin/outpost is up to date" "$1" && grep -q "outpost-device.service is up to date" "$1"' sh "$work/install2.log"
check "second run: the config is kept" grep -q "device.toml exists: kept" "$work/install2.log"
check "second run: no user added twice" test "$(grep -c '^outpost:' "$r/etc/passwd")" = 1
run_install "$work/install3.log" --root "$r" "${fleet_args[@]/edge-0001/edge-0002}" "$tarball" || bad "install with other flags exits 0"
check "other flags without --force-config: config kept, with a warning" \
  sh -c 'grep -q "is kept: the configuration flags are not applied" "$1" && grep -qx "device_id = \"edge-0001\"" "$2"' sh "$work/install3.log" "$conf"
run_install "$work/install4.log" --root "$r" --force-config "${fleet_args[@]/edge-0001/edge-0002}" "$tarball" || bad "install --force-config exits 0"
check "--force-config: config replaced" grep -qx 'device_id = "edge-0002"' "$conf"
check "--force-config: mode and owner kept" is_meta "$r" /etc/outpost/device.toml "regular file 640" "0:$gid"

# --- 3. a tampered release ---------------------------------------------------------------------
echo "== a tampered release is refused, the root untouched"
t="$work/tampered"
cp -R "$rel" "$t"
printf 'x' >> "$t/device.toml"
r2="$work/root2"; new_root "$r2"; listing "$r2" "$work/r2.list"
if run_install "$work/tampered.log" --root "$r2" "$t"; then bad "a file changed after signing: refused"; else
  check "a file changed after signing: refused with 'checksum mismatch'" grep -q "checksum mismatch" "$work/tampered.log"
fi
check "tampered: fresh root untouched" unchanged "$r2" "$work/r2.list"
listing "$r" "$work/r.list"
run_install "$work/tampered2.log" --root "$r" --force-config "${fleet_args[@]}" "$t" && bad "tampered over an install: refused"
check "tampered: installed root untouched" unchanged "$r" "$work/r.list"
cp -R "$rel" "$work/extra"; echo hi > "$work/extra/unlisted"
run_install "$work/extra.log" --root "$r2" "$work/extra" && bad "a file not in SHA256SUMS: refused"
check "a file not in SHA256SUMS: refused" grep -q "unlisted is in the release but not in SHA256SUMS" "$work/extra.log"
cp -R "$rel" "$work/nosig"; rm "$work/nosig/SHA256SUMS.sig"
run_install "$work/nosig.log" --root "$r2" "$work/nosig" && bad "no SHA256SUMS.sig: refused"
check "no SHA256SUMS.sig: refused" grep -q "lacks SHA256SUMS.sig" "$work/nosig.log"
if [ "$can_sign" = 1 ]; then
  run_install "$work/wrongkey.log" --root "$r2" --release-key "$other_key" --verifier "$bin" "$rel" && bad "wrong release key: refused"
  check "signed by another key: refused" grep -q "signature does not verify" "$work/wrongkey.log"
else
  note "signature refusal not tested: this outpost has no \`release verify\`"
fi
check "refusals: fresh root untouched" unchanged "$r2" "$work/r2.list"

# --- 4. bad flags and a config that does not parse ---------------------------------------------
echo "== bad input is refused before anything is written"
bad_case() { # bad_case DESCRIPTION EXPECTED-MESSAGE ARGS...
  local desc=$1 msg=$2; shift 2
  if run_install "$work/bad.log" --root "$r2" "$@"; then bad "$desc: refused"; return; fi
  if grep -q -- "$msg" "$work/bad.log"; then ok "$desc: refused ($(grep -m1 error: "$work/bad.log" | cut -c1-110))"
  else bad "$desc: message '$msg' in: $(cat "$work/bad.log")"; fi
}
bad_case "--device-id with a space" "device-id" --device-id "bad id" --broker mqtt://h:1 --fleet-key-file "$work/fleet.pub" "$rel"
bad_case "--tag K=V" "a tag is a name" --tag site=berlin --broker mqtt://h:1 --fleet-key-file "$work/fleet.pub" "$rel"
bad_case "--broker http://" "is not a URL like" --broker http://h:1 --fleet-key-file "$work/fleet.pub" "$rel"
bad_case "--broker without a fleet key" "needs the fleet's public key" --broker mqtt://h:1 "$rel"
bad_case "--fleet-key not hex" "64 hex digits" --broker mqtt://h:1 --fleet-key nothex "$rel"
bad_case "--listen without a port" "is not HOST:PORT" --listen 0.0.0.0 "$rel"
mkdir -p "$work/empty-root"
bad_case "--root that is no root filesystem" "does not look like a root filesystem" --root "$work/empty-root" "$rel"
printf 'listen = \n' > "$work/bad.toml"
checked_rel=$rel
if [ "$has_check" = 0 ]; then
  checked_rel="$work/stub-release"; make_release "$checked_rel" "$stub"
  note "config refusal runs with the stub binary (its check-config parses TOML)"
fi
bad_case "a config that does not parse" "does not check" --config "$work/bad.toml" "$checked_rel"
printf 'surprise = 1\n' > "$work/unknown.toml"
bad_case "a config with an unknown field" "does not check" --config "$work/unknown.toml" "$checked_rel"
check "bad input: root untouched" unchanged "$r2" "$work/r2.list"
if [ ! -d /run/systemd/system ]; then
  # Live (no --root) on a system without systemd. --dry-run as a guard: the refusal comes
  # from the checks, which run the same with it, so a regression cannot touch this machine.
  if sh "$install_sh" --dry-run "$rel" > "$work/live.log" 2>&1; then bad "no systemd, no --root: refused"
  elif [ "$as_root" = 1 ]; then
    check "no systemd, no --root: refused, naming systemd and --no-systemd" \
      grep -q "not running systemd.*--no-systemd" "$work/live.log"
  else
    check "no --root, not root: refused" grep -q "needs root" "$work/live.log"
  fi
else
  note "this machine runs systemd: the no-systemd refusal is not tested here"
fi

# --- 5. a binary for another architecture ------------------------------------------------------
echo "== a release for another architecture installs with the config check skipped"
# A file with an aarch64 ELF header (e_machine 0xb7) that cannot run here.
foreign="$work/foreign-bin"
printf '\177ELF\002\001\001\000\000\000\000\000\000\000\000\000\002\000\267\000' > "$foreign"
head -c 4096 /dev/zero >> "$foreign"
if [ "$(uname -m)" != aarch64 ]; then
  make_release "$work/foreign" "$foreign" 2>/dev/null || true
  r3="$work/root3"; new_root "$r3"
  if run_install "$work/foreign.log" --root "$r3" --broker mqtt://h:1883 --fleet-key-file "$work/fleet.pub" "$work/foreign"; then
    check "aarch64 binary: says it does not run here and skips check-config" \
      sh -c 'grep -q "for aarch64; it does not run on this host" "$1" && grep -q "check-config. is skipped" "$1"' sh "$work/foreign.log"
    check "aarch64 binary: installed" cmp -s "$foreign" "$r3/usr/local/bin/outpost"
  else
    bad "aarch64 binary: install exits 0"; cat "$work/foreign.log"
  fi
fi

# --- 6. dry run --------------------------------------------------------------------------------
echo "== --dry-run prints every step and changes nothing"
run_install "$work/dry.log" --dry-run --root "$r2" "${fleet_args[@]}" "$tarball" || { bad "--dry-run exits 0"; cat "$work/dry.log"; }
check "--dry-run on a fresh root: untouched" unchanged "$r2" "$work/r2.list"
check "--dry-run prints each step (user, group, dirs, binary, config, unit, link)" \
  test "$(grep -c '^  would: ' "$work/dry.log")" -ge 10
check "--dry-run says nothing was changed" grep -q "dry run: nothing was changed" "$work/dry.log"
listing "$r" "$work/r.list"
run_install "$work/dry2.log" --dry-run --uninstall --purge --root "$r" || bad "--dry-run --uninstall exits 0"
check "--dry-run --uninstall --purge: installed root untouched" unchanged "$r" "$work/r.list"

# --- 7. uninstall and purge --------------------------------------------------------------------
echo "== --uninstall, then --purge"
echo "state" > "$r/var/lib/outpost/keep-me"
run_install "$work/un.log" --uninstall --root "$r" || { bad "--uninstall exits 0"; cat "$work/un.log"; }
check "--uninstall: binary removed" test ! -e "$r/usr/local/bin/outpost"
check "--uninstall: unit removed" test ! -e "$r/etc/systemd/system/outpost-device.service"
check "--uninstall: wants link removed" test ! -L "$link"
check "--uninstall: /var/lib/outpost kept" test -f "$r/var/lib/outpost/keep-me"
check "--uninstall: /etc/outpost and the user kept" sh -c 'test -f "$1/etc/outpost/device.toml" && grep -q "^outpost:" "$1/etc/passwd"' sh "$r"
listing "$r" "$work/r.list"
run_install "$work/un2.log" --uninstall --root "$r" || bad "second --uninstall exits 0"
check "a second --uninstall changes nothing" unchanged "$r" "$work/r.list"
run_install "$work/purge.log" --uninstall --purge --root "$r" || { bad "--purge exits 0"; cat "$work/purge.log"; }
check "--purge: /var/lib/outpost and /etc/outpost removed" sh -c 'test ! -e "$1/var/lib/outpost" && test ! -e "$1/etc/outpost"' sh "$r"
check "--purge: etc/passwd and etc/group as before the install" \
  sh -c 'cmp -s "$1/etc/passwd" "$2" && cmp -s "$1/etc/group" "$3"' sh "$r" "$work/passwd.orig" "$work/group.orig"
check "--purge: no outpost entry in shadow or gshadow" sh -c '! grep -q "^outpost:" "$1/etc/shadow" "$1/etc/gshadow"' sh "$r"
check "--purge: etc/shadow keeps mode 0640" is_meta "$r" /etc/shadow "regular file 640" 0:0

echo
echo "install: $passed passed, $failed failed"
[ "$failed" = 0 ]
