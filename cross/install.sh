#!/bin/sh
# Installs an Outpost device release (a tarball from the release workflow, or the directory it
# unpacks to) onto this machine, or into an image's root filesystem with --root DIR.
#
# Every check runs before anything is written: the release's checksums (and its signature with
# --release-key), the flags, and the device configuration (`outpost device check-config`). Then
# the files are staged in a temporary directory and moved into place one by one, each with an
# atomic rename next to its destination. Running it twice gives the same result.
#
# Run `cross/install.sh --help` for the flags. cross/test-install.sh tests it into a temporary
# root. POSIX sh: it runs under dash and busybox sh as well as bash.
set -eu

PROG=install.sh
BIN_DEST=/usr/local/bin/outpost
CONF_DIR=/etc/outpost
STATE_DIR=/var/lib/outpost
UNIT_NAME=outpost-device.service
UNIT_DEST=/etc/systemd/system/$UNIT_NAME
WANTS_DIR=/etc/systemd/system/multi-user.target.wants
USER_NAME=outpost

usage() {
  cat <<'EOF'
Usage: install.sh [OPTIONS] RELEASE
       install.sh --uninstall [--purge] [--root DIR] [--dry-run]

Installs an Outpost device release: RELEASE is a tarball (outpost-VERSION-TARGET.tar.gz) or the
directory it unpacks to, holding outpost, outpost-device.service, device.toml, LICENSE,
SHA256SUMS and SHA256SUMS.sig.

What it does, after every check has passed:
  - creates the system user and group `outpost`;
  - installs the binary to /usr/local/bin/outpost (0755 root:root);
  - creates /etc/outpost (0750 root:outpost) and /var/lib/outpost (0750 outpost:outpost);
  - writes /etc/outpost/device.toml (0640 root:outpost) from the flags below, unless one exists;
  - installs /etc/systemd/system/outpost-device.service and enables it (under --root: the
    multi-user.target.wants link; on a live system: systemctl enable, then restart).

Where:
  --root DIR            install into the root filesystem at DIR (an image being built): users
                        are added to DIR/etc/passwd, group and shadow; systemctl is not called
  --dry-run             check everything, print every step, change nothing
  --no-systemd          on a live system without systemd: install the files, skip the unit
  --no-start            on a live system: enable the unit but do not (re)start it

Verification:
  --release-key HEX     also verify SHA256SUMS.sig against this ed25519 public key (64 hex
                        digits) with `outpost release verify`; without it only the checksums
                        are checked, which catches corruption, not tampering
  --verifier PATH       the outpost binary that verifies the signature (default: `outpost` on
                        PATH if it has `release verify`, else the release's own binary)

Device configuration (written to /etc/outpost/device.toml):
  --broker URL          the fleet's MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT; without
                        it the device runs stand-alone
  --fleet-key HEX       the fleet's public key (64 hex digits; `outpost fleet serve` prints it)
  --fleet-key-file FILE ...or its key file (fleet-data/fleet.pub), installed as
                        /etc/outpost/fleet.pub
  --device-id ID        this device's id (default: the host name at run time); letters,
                        digits, `.`, `_`, `-`, at most 64, starting with a letter or digit
  --tag NAME            a group this device belongs to (repeat for several); same rules as ids
  --listen ADDR         the inference endpoint, HOST:PORT (default 127.0.0.1:8080)
  --mqtt-password-file FILE
                        the broker password `outpost fleet enroll --password-out` wrote; the
                        user name is the device id (so --device-id is required); installed as
                        /etc/outpost/mqtt-password (0640 root:outpost)
  --ca-file FILE        the fleet's CA certificates (PEM) for mqtts:// and https://, installed
                        as /etc/outpost/fleet-ca.pem
  --trust FILE          the trust store (`outpost key trust`), installed as
                        /etc/outpost/trust.toml; the device does not start without one
  --config FILE         install this device.toml instead of writing one from the flags above
  --force-config        replace an existing /etc/outpost/device.toml (kept by default)

Removal:
  --uninstall           remove the binary, the unit and its wants link (and disable it); keep
                        /etc/outpost, /var/lib/outpost and the user
  --purge               with --uninstall: also remove /etc/outpost, /var/lib/outpost and the
                        outpost user and group

  -h, --help            this text
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
say() { printf '%s\n' "$*"; }

# --- arguments ---------------------------------------------------------------------------------
ROOT="" RELEASE="" DRY=0 NO_SYSTEMD=0 NO_START=0 FORCE_CONFIG=0 UNINSTALL=0 PURGE=0
RELEASE_KEY="" VERIFIER="" BROKER="" FLEET_KEY="" FLEET_KEY_FILE="" DEVICE_ID="" TAGS=""
LISTEN="" PASSWORD_FILE="" CA_FILE="" TRUST="" CONFIG_IN="" CONFIG_FLAGS=0

need_arg() { [ "$2" -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --root) need_arg "$1" $#; ROOT=$2; shift ;;
    --dry-run) DRY=1 ;;
    --no-systemd) NO_SYSTEMD=1 ;;
    --no-start) NO_START=1 ;;
    --force-config) FORCE_CONFIG=1 ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    --release-key) need_arg "$1" $#; RELEASE_KEY=$2; shift ;;
    --verifier) need_arg "$1" $#; VERIFIER=$2; shift ;;
    --broker) need_arg "$1" $#; BROKER=$2; CONFIG_FLAGS=1; shift ;;
    --fleet-key) need_arg "$1" $#; FLEET_KEY=$2; CONFIG_FLAGS=1; shift ;;
    --fleet-key-file) need_arg "$1" $#; FLEET_KEY_FILE=$2; CONFIG_FLAGS=1; shift ;;
    --device-id) need_arg "$1" $#; DEVICE_ID=$2; CONFIG_FLAGS=1; shift ;;
    --tag) need_arg "$1" $#; TAGS="$TAGS $2"; CONFIG_FLAGS=1; shift ;;
    --listen) need_arg "$1" $#; LISTEN=$2; CONFIG_FLAGS=1; shift ;;
    --mqtt-password-file) need_arg "$1" $#; PASSWORD_FILE=$2; CONFIG_FLAGS=1; shift ;;
    --ca-file) need_arg "$1" $#; CA_FILE=$2; CONFIG_FLAGS=1; shift ;;
    --trust) need_arg "$1" $#; TRUST=$2; shift ;;
    --config) need_arg "$1" $#; CONFIG_IN=$2; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$RELEASE" ] || die "one release at a time (got $RELEASE and $1)"; RELEASE=$1 ;;
  esac
  shift
done
[ $# -eq 0 ] || { [ -z "$RELEASE" ] && [ $# -eq 1 ] && RELEASE=$1; } || die "unexpected arguments: $*"

if [ -n "$ROOT" ]; then
  [ -d "$ROOT" ] || die "--root $ROOT is not a directory"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" != / ] || ROOT=""
fi
LIVE=1; [ -z "$ROOT" ] || LIVE=0
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge goes with --uninstall"

# Whether chown works: as root, yes. Into an image root as another user, files keep that user's
# ownership and the image tool (fakeroot, a rootless build) must set owners when it packs them.
CAN_CHOWN=1
if [ "$(id -u)" -ne 0 ]; then
  [ "$LIVE" = 0 ] || die "installing onto this system needs root (or use --root DIR for an image)"
  CAN_CHOWN=0
  warn "not running as root: owners are not set under $ROOT (modes are); set them when the image is packed"
fi

# --- small helpers -----------------------------------------------------------------------------
# act DESCRIPTION COMMAND...: print the step; run it unless --dry-run.
act() {
  act_desc=$1; shift
  if [ "$DRY" = 1 ]; then say "  would: $act_desc"; else say "  $act_desc"; "$@"; fi
}

STAGE=""
cleanup() { [ -z "$STAGE" ] || rm -rf "$STAGE"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/outpost-install.XXXXXX")

is_id() { # the runtime's rule for device ids and tags (outpost_proto::is_valid_device_id)
  case $1 in ''|[!A-Za-z0-9]*|*[!A-Za-z0-9._-]*) return 1 ;; esac
  [ "${#1}" -le 64 ]
}
is_hex64() { [ "${#1}" -eq 64 ] && case $1 in *[!0-9a-fA-F]*) false ;; *) true ;; esac; }
readable() { { [ -f "$2" ] && [ -r "$2" ]; } || die "$1 $2: not a readable file"; }

# ELF e_machine (bytes 18-19, little-endian) as an architecture name.
elf_arch() {
  case $(od -An -tx1 -j18 -N2 "$1" 2>/dev/null | tr -d ' \n') in
    3e00) echo x86_64 ;; b700) echo aarch64 ;; 2800) echo arm ;; f300) echo riscv64 ;;
    0300) echo i386 ;; '') echo "not an ELF file" ;; *) echo "unknown" ;;
  esac
}

# --- the outpost user, in ROOT's files or the live system's ------------------------------------
# Under --root the entries are appended to ROOT/etc/passwd, group, shadow and gshadow (those that
# exist), with the first free id counting down from 999 as useradd allocates system ids.
ROOT_UID="" ROOT_GID=""
field_of() { awk -F: -v n="$2" -v f="$3" '$1 == n { print $f; exit }' "$1" 2>/dev/null; }
id_taken() { awk -F: -v id="$2" '$3 == id { found = 1 } END { exit !found }' "$1" 2>/dev/null; }
lookup_root_ids() {
  ROOT_GID=$(field_of "$ROOT/etc/group" "$USER_NAME" 3)
  ROOT_UID=$(field_of "$ROOT/etc/passwd" "$USER_NAME" 3)
  if [ -n "$ROOT_UID" ] && [ -z "$ROOT_GID" ]; then
    die "$ROOT/etc/passwd has a user $USER_NAME but $ROOT/etc/group has no such group"
  fi
}
pick_root_ids() {
  [ -z "$ROOT_GID" ] || NEW_GID=$ROOT_GID
  if [ -z "$ROOT_GID" ]; then
    NEW_GID=999
    while id_taken "$ROOT/etc/group" "$NEW_GID"; do NEW_GID=$((NEW_GID - 1)); done
  fi
  # A new user gets the group's number when it is free.
  if [ -n "$ROOT_UID" ]; then
    NEW_UID=$ROOT_UID
  else
    NEW_UID=$NEW_GID
    while id_taken "$ROOT/etc/passwd" "$NEW_UID"; do NEW_UID=$((NEW_UID - 1)); done
  fi
  { [ "$NEW_GID" -ge 100 ] && [ "$NEW_UID" -ge 100 ]; } || die "no free system id in $ROOT/etc/passwd or group"
}
append_line() { printf '%s\n' "$2" >> "$1"; }
remove_entry() { # remove_entry FILE NAME: drop the NAME: line, keeping the file's mode and owner
  [ -f "$1" ] || return 0
  awk -F: -v n="$2" '$1 != n' "$1" > "$1.outpost-new"
  cat "$1.outpost-new" > "$1"
  rm -f "$1.outpost-new"
}
nologin_shell() {
  for s in /usr/sbin/nologin /sbin/nologin; do [ -e "$ROOT$s" ] && { echo "$s"; return; }; done
  echo /usr/sbin/nologin
}

ensure_user() {
  if [ "$LIVE" = 0 ]; then
    lookup_root_ids
    pick_root_ids
    # The shadow entry's last-change day: SOURCE_DATE_EPOCH's when set (a reproducible image).
    days=$(( ${SOURCE_DATE_EPOCH:-$(date +%s)} / 86400 ))
    if [ -z "$ROOT_GID" ]; then
      act "add group $USER_NAME (gid $NEW_GID) to $ROOT/etc/group" \
        append_line "$ROOT/etc/group" "$USER_NAME:x:$NEW_GID:"
      if [ -f "$ROOT/etc/gshadow" ]; then
        act "add group $USER_NAME to $ROOT/etc/gshadow" append_line "$ROOT/etc/gshadow" "$USER_NAME:!::"
      fi
    else
      say "  group $USER_NAME exists (gid $ROOT_GID)"
    fi
    if [ -z "$ROOT_UID" ]; then
      act "add user $USER_NAME (uid $NEW_UID) to $ROOT/etc/passwd" append_line "$ROOT/etc/passwd" \
        "$USER_NAME:x:$NEW_UID:$NEW_GID:Outpost device runtime:$STATE_DIR:$(nologin_shell)"
      if [ -f "$ROOT/etc/shadow" ]; then
        act "add user $USER_NAME (locked password) to $ROOT/etc/shadow" \
          append_line "$ROOT/etc/shadow" "$USER_NAME:!:$days::::::"
      fi
    else
      say "  user $USER_NAME exists (uid $ROOT_UID)"
    fi
    ROOT_UID=$NEW_UID ROOT_GID=$NEW_GID
    OWN_USER=$ROOT_UID:$ROOT_GID OWN_ROOT_GROUP=0:$ROOT_GID
  else
    if getent group "$USER_NAME" >/dev/null 2>&1; then
      say "  group $USER_NAME exists"
    elif command -v groupadd >/dev/null 2>&1; then
      act "groupadd --system $USER_NAME" groupadd --system "$USER_NAME"
    else
      act "addgroup -S $USER_NAME" addgroup -S "$USER_NAME"
    fi
    if id "$USER_NAME" >/dev/null 2>&1; then
      say "  user $USER_NAME exists"
    elif command -v useradd >/dev/null 2>&1; then
      act "useradd --system $USER_NAME (home $STATE_DIR, no login)" useradd --system --gid "$USER_NAME" \
        --no-create-home --home-dir "$STATE_DIR" --shell "$(nologin_shell)" \
        --comment "Outpost device runtime" "$USER_NAME"
    else
      act "adduser -S $USER_NAME (home $STATE_DIR, no login)" adduser -S -D -H -h "$STATE_DIR" \
        -s "$(nologin_shell)" -G "$USER_NAME" "$USER_NAME"
    fi
    OWN_USER=$USER_NAME:$USER_NAME OWN_ROOT_GROUP=root:$USER_NAME
  fi
}

# --- placing files -----------------------------------------------------------------------------
# Owner and mode of a path as "MODE OWNER" (numeric), for the unchanged check.
meta() { stat -c '%a %u:%g' "$1" 2>/dev/null || echo none; }
numeric_owner() { # user:group names (live) or ids (root) as uid:gid
  case $1 in
    *[!0-9:]*) printf '%s:%s' "$(id -u "${1%%:*}" 2>/dev/null || echo 0)" \
      "$(getent group "${1#*:}" | cut -d: -f3)" ;;
    *) printf '%s' "$1" ;;
  esac
}
same_meta() { # same_meta PATH MODE OWNER
  want_mode=$(printf '%o' "0$2")
  if [ "$CAN_CHOWN" = 1 ]; then
    [ "$(meta "$1")" = "$want_mode $(numeric_owner "$3")" ]
  else
    [ "$(meta "$1" | cut -d' ' -f1)" = "$want_mode" ]
  fi
}
set_owner() { [ "$CAN_CHOWN" = 0 ] || chown "$1" "$2"; }

make_dir_now() { mkdir -p "$1" && chmod "$2" "$1" && set_owner "$3" "$1"; }
fix_dir_now() { chmod "$2" "$1" && set_owner "$3" "$1"; }
ensure_dir() { # ensure_dir PATH MODE OWNER: Outpost's own directories, mode and owner enforced
  if [ -d "$ROOT$1" ] && same_meta "$ROOT$1" "$2" "$3"; then
    say "  $1 is in place"
  elif [ -d "$ROOT$1" ]; then
    act "set $1 to mode $2, owner $3" fix_dir_now "$ROOT$1" "$2" "$3"
  else
    act "create $1 (mode $2, owner $3)" make_dir_now "$ROOT$1" "$2" "$3"
  fi
}
make_dir() { # make_dir PATH MODE OWNER: the system's directories, created when missing only
  [ -d "$ROOT$1" ] || act "create $1 (mode $2, owner $3)" make_dir_now "$ROOT$1" "$2" "$3"
}

place_now() { # SRC DEST MODE OWNER: copy beside DEST, set mode and owner, rename over DEST
  pn_tmp="$(dirname "$2")/.$(basename "$2").outpost-new"
  rm -f "$pn_tmp"
  cp "$1" "$pn_tmp"
  chmod "$3" "$pn_tmp"
  set_owner "$4" "$pn_tmp"
  mv -f "$pn_tmp" "$2"
}
place() { # place SRC DEST MODE OWNER (DEST without ROOT)
  if [ -f "$ROOT$2" ] && [ ! -L "$ROOT$2" ] && cmp -s "$1" "$ROOT$2" && same_meta "$ROOT$2" "$3" "$4"; then
    say "  $2 is up to date"
  else
    act "install $2 (mode $3, owner $4)" place_now "$1" "$ROOT$2" "$3" "$4"
  fi
}
remove_path() { # remove_path PATH (without ROOT)
  if [ -e "$ROOT$1" ] || [ -L "$ROOT$1" ]; then act "remove $1" rm -rf "$ROOT$1"; else say "  $1 is absent"; fi
}

# --- uninstall ---------------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
  [ -z "$RELEASE" ] || die "--uninstall takes no release"
  say "Removing Outpost from ${ROOT:-this system}${ROOT:+ (image root)}"
  if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    if [ -f "$UNIT_DEST" ]; then
      act "systemctl disable --now $UNIT_NAME" systemctl disable --now "$UNIT_NAME"
    fi
  fi
  remove_path "$WANTS_DIR/$UNIT_NAME"
  remove_path "$UNIT_DEST"
  remove_path "$BIN_DEST"
  if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    act "systemctl daemon-reload" systemctl daemon-reload
  fi
  if [ "$PURGE" = 1 ]; then
    remove_path "$CONF_DIR"
    remove_path "$STATE_DIR"
    if [ "$LIVE" = 0 ]; then
      for f in passwd shadow group gshadow; do
        if grep -q "^$USER_NAME:" "$ROOT/etc/$f" 2>/dev/null; then
          act "remove $USER_NAME from $ROOT/etc/$f" remove_entry "$ROOT/etc/$f" "$USER_NAME"
        fi
      done
    else
      if id "$USER_NAME" >/dev/null 2>&1; then
        if command -v userdel >/dev/null 2>&1; then act "userdel $USER_NAME" userdel "$USER_NAME"
        else act "deluser $USER_NAME" deluser "$USER_NAME"; fi
      fi
      if getent group "$USER_NAME" >/dev/null 2>&1; then
        if command -v groupdel >/dev/null 2>&1; then act "groupdel $USER_NAME" groupdel "$USER_NAME"
        else act "delgroup $USER_NAME" delgroup "$USER_NAME"; fi
      fi
    fi
  else
    say "  kept $CONF_DIR, $STATE_DIR and the $USER_NAME user (--purge removes them)"
  fi
  [ "$DRY" = 0 ] || say "dry run: nothing was changed"
  exit 0
fi

[ -n "$RELEASE" ] || { usage >&2; exit 2; }

# --- checks on the target ----------------------------------------------------------------------
say "Checking"
if [ "$LIVE" = 0 ]; then
  { [ -f "$ROOT/etc/passwd" ] && [ -f "$ROOT/etc/group" ]; } ||
    die "$ROOT does not look like a root filesystem: etc/passwd or etc/group is missing"
  say "  target: image root $ROOT"
else
  if [ ! -d /run/systemd/system ]; then
    [ "$NO_SYSTEMD" = 1 ] ||
      die "this system is not running systemd (no /run/systemd/system): give --no-systemd to install the files without the unit, or --root DIR for an image"
    say "  target: this system, without systemd (--no-systemd)"
  else
    command -v systemctl >/dev/null 2>&1 || die "/run/systemd/system exists but systemctl is not on PATH"
    say "  target: this system (systemd)"
  fi
  command -v useradd >/dev/null 2>&1 || command -v adduser >/dev/null 2>&1 ||
    die "neither useradd nor adduser is available to create the $USER_NAME user"
fi
for t in sha256sum tar od awk cmp stat; do
  command -v "$t" >/dev/null 2>&1 || die "$t is needed and not on PATH"
done

# --- the release: unpack, checksums, signature -------------------------------------------------
mkdir "$STAGE/release"
if [ -d "$RELEASE" ]; then
  cp -R "$RELEASE/." "$STAGE/release/"
elif [ -f "$RELEASE" ]; then
  # Refuse absolute names, `..` and anything but files and directories before unpacking.
  tar -tf "$RELEASE" > "$STAGE/members" 2>/dev/null || die "$RELEASE is not a readable tarball"
  if grep -Eq '^/|(^|/)\.\.(/|$)' "$STAGE/members"; then die "$RELEASE has absolute or .. member names"; fi
  tar -xf "$RELEASE" -C "$STAGE/release" || die "cannot unpack $RELEASE"
else
  die "$RELEASE: no such file or directory"
fi
if [ -n "$(find "$STAGE/release" ! -type f ! -type d)" ]; then
  die "$RELEASE holds links or special files; a release holds regular files only"
fi
# The files are at the top, or in the one directory the tarball holds.
REL=$STAGE/release
if [ ! -f "$REL/SHA256SUMS" ]; then
  set -- "$REL"/*/SHA256SUMS
  { [ $# -eq 1 ] && [ -f "$1" ]; } || die "$RELEASE has no SHA256SUMS (at its top or in one directory)"
  REL=$(dirname "$1")
fi
for f in outpost "$UNIT_NAME" device.toml LICENSE SHA256SUMS SHA256SUMS.sig; do
  [ -f "$REL/$f" ] || die "$RELEASE lacks $f"
done
# Every line names a plain file beside SHA256SUMS, and every file is named.
# (No interval expressions: mawk, Debian's default awk, lacks them.)
awk '{
  hash = substr($0, 1, 64); sep = substr($0, 65, 2); name = substr($0, 67); sub(/^[*]/, "", name)
  if (length(hash) != 64 || hash ~ /[^0-9a-f]/ || sep != "  " || name == "" || name ~ /[^A-Za-z0-9._-]/) {
    print "bad line: " $0; exit 1
  }
}' "$REL/SHA256SUMS" >&2 || die "SHA256SUMS is not in sha256sum's format"
for f in "$REL"/*; do
  name=$(basename "$f")
  case $name in SHA256SUMS|SHA256SUMS.sig) continue ;; esac
  awk -v n="$name" '{ sub(/^[*]/, "", $2) } $2 == n { found = 1 } END { exit !found }' "$REL/SHA256SUMS" ||
    die "$name is in the release but not in SHA256SUMS"
done
if ! (cd "$REL" && sha256sum -c SHA256SUMS) > "$STAGE/sums.out" 2>&1; then
  cat "$STAGE/sums.out" >&2
  die "checksum mismatch in $RELEASE: nothing was installed"
fi
say "  checksums: every file matches SHA256SUMS"
chmod 0755 "$REL/outpost"

# Can the release's binary run here? (Not when it is for another architecture than the host.)
BIN_RUNS=0
if "$REL/outpost" --version > "$STAGE/version" 2>/dev/null; then
  BIN_RUNS=1
  say "  binary: $(head -1 "$STAGE/version")"
else
  BIN_ARCH=$(elf_arch "$REL/outpost")
  say "  binary: for $BIN_ARCH; it does not run on this host ($(uname -m))"
fi
has_cmd() { "$1" "$2" "$3" --help >/dev/null 2>&1; } # has_cmd BIN GROUP SUBCOMMAND

if [ -n "$RELEASE_KEY" ]; then
  is_hex64 "$RELEASE_KEY" || die "--release-key must be 64 hex digits (an ed25519 public key)"
  if [ -z "$VERIFIER" ]; then
    if command -v outpost >/dev/null 2>&1 && has_cmd outpost release verify; then
      VERIFIER=$(command -v outpost)
    elif [ "$BIN_RUNS" = 1 ] && has_cmd "$REL/outpost" release verify; then
      VERIFIER=$REL/outpost
      warn "the signature is checked by the release's own binary: that catches a wrong key or a corrupted file, not a release whose binary was replaced; give --verifier with a trusted outpost for that"
    else
      die "--release-key was given but no outpost here has \`release verify\` (give --verifier PATH)"
    fi
  fi
  has_cmd "$VERIFIER" release verify || die "$VERIFIER has no \`release verify\` command"
  if ! "$VERIFIER" release verify --key "$RELEASE_KEY" "$REL" > "$STAGE/verify.out" 2>&1; then
    cat "$STAGE/verify.out" >&2
    die "the release signature does not verify against --release-key: nothing was installed"
  fi
  say "  signature: SHA256SUMS.sig verifies against the release key ($VERIFIER)"
else
  warn "no --release-key: the signature is not checked (the checksums catch corruption, not tampering)"
fi

# --- the configuration -------------------------------------------------------------------------
toml_str() { # a TOML basic string; the values were checked to hold no quote or backslash
  printf '"%s"' "$1"
}
if [ -n "$CONFIG_IN" ] && [ "$CONFIG_FLAGS" = 1 ]; then
  die "--config FILE and the configuration flags (--broker, --fleet-key, ...) exclude each other"
fi
if [ -n "$BROKER" ]; then
  case $BROKER in
    mqtt://?*|mqtts://?*|tcp://?*|ssl://?*) ;;
    *) die "--broker $BROKER is not a URL like mqtt://HOST:1883 or mqtts://HOST:8883" ;;
  esac
  case $BROKER in *[\"\\\ ]*) die "--broker $BROKER holds a quote, backslash or space" ;; esac
  [ -n "$FLEET_KEY$FLEET_KEY_FILE" ] ||
    die "--broker needs the fleet's public key: --fleet-key HEX or --fleet-key-file FILE"
fi
[ -z "$FLEET_KEY" ] || [ -z "$FLEET_KEY_FILE" ] || die "give --fleet-key or --fleet-key-file, not both"
[ -z "$FLEET_KEY" ] || is_hex64 "$FLEET_KEY" || die "--fleet-key must be 64 hex digits (the fleet's ed25519 public key)"
[ -z "$FLEET_KEY_FILE" ] || readable --fleet-key-file "$FLEET_KEY_FILE"
[ -z "$DEVICE_ID" ] || is_id "$DEVICE_ID" ||
  die "--device-id $DEVICE_ID: use letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)"
set -f
for t in $TAGS; do
  case $t in
    *=*) die "--tag $t: a tag is a name, not KEY=VALUE (e.g. --tag ${t%%=*}-${t#*=}); \`outpost fleet deploy --tag NAME\` targets it" ;;
  esac
  is_id "$t" || die "--tag $t: use letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)"
done
set +f
if [ -n "$LISTEN" ]; then
  l_port=${LISTEN##*:} l_host=${LISTEN%:*}
  case $LISTEN in *:*) ;; *) l_port="" ;; esac
  case $l_port in ''|*[!0-9]*) l_port="" ;; esac
  case $l_host in ''|*[\"\\\ ]*) l_port="" ;; esac
  [ -n "$l_port" ] || die "--listen $LISTEN is not HOST:PORT (e.g. 0.0.0.0:8080 or [::]:8080)"
fi
if [ -n "$PASSWORD_FILE" ]; then
  readable --mqtt-password-file "$PASSWORD_FILE"
  [ -n "$DEVICE_ID" ] || die "--mqtt-password-file needs --device-id (the broker user name is the device id)"
  [ -n "$BROKER" ] || die "--mqtt-password-file needs --broker"
fi
[ -z "$CA_FILE" ] || readable --ca-file "$CA_FILE"
[ -z "$TRUST" ] || readable --trust "$TRUST"
[ -z "$CONFIG_IN" ] || readable --config "$CONFIG_IN"
if [ -z "$BROKER" ] && { [ -n "$FLEET_KEY$FLEET_KEY_FILE$CA_FILE" ] || [ -n "$TAGS" ]; }; then
  die "--fleet-key, --fleet-key-file, --tag and --ca-file configure the fleet connection: give --broker too"
fi

# The files that go into /etc/outpost, staged side by side so that the check sees the relative
# paths the config uses (they resolve against the config's own directory).
SC=$STAGE/etc-outpost
mkdir "$SC"
[ -z "$TRUST" ] || cp "$TRUST" "$SC/trust.toml"
[ -z "$FLEET_KEY_FILE" ] || cp "$FLEET_KEY_FILE" "$SC/fleet.pub"
[ -z "$PASSWORD_FILE" ] || cp "$PASSWORD_FILE" "$SC/mqtt-password"
[ -z "$CA_FILE" ] || cp "$CA_FILE" "$SC/fleet-ca.pem"

KEEP_CONFIG=0
if [ -f "$ROOT$CONF_DIR/device.toml" ] && [ "$FORCE_CONFIG" = 0 ]; then
  KEEP_CONFIG=1
  if [ "$CONFIG_FLAGS" = 1 ] || [ -n "$CONFIG_IN" ]; then
    warn "$CONF_DIR/device.toml exists and is kept: the configuration flags are not applied (--force-config replaces it)"
  fi
  # Checked as it will be read: beside the files already in place, and those given now.
  cp -R "$ROOT$CONF_DIR/." "$SC/" 2>/dev/null || true
  [ -z "$TRUST" ] || cp "$TRUST" "$SC/trust.toml"
  [ -z "$FLEET_KEY_FILE" ] || cp "$FLEET_KEY_FILE" "$SC/fleet.pub"
  [ -z "$PASSWORD_FILE" ] || cp "$PASSWORD_FILE" "$SC/mqtt-password"
  [ -z "$CA_FILE" ] || cp "$CA_FILE" "$SC/fleet-ca.pem"
elif [ -n "$CONFIG_IN" ]; then
  cp "$CONFIG_IN" "$SC/device.toml"
else
  {
    echo "# Outpost device configuration, written by install.sh. Every field, with its default and"
    echo "# a comment: \`outpost device default-config\`. Relative paths are relative to this file."
    echo "data_dir = $(toml_str "$STATE_DIR")"
    echo "listen = $(toml_str "${LISTEN:-127.0.0.1:8080}")"
    echo "trust_store = \"trust.toml\""
    if [ -n "$BROKER" ]; then
      echo
      echo "[fleet]"
      echo "broker = $(toml_str "$BROKER")"
      if [ -n "$FLEET_KEY" ]; then echo "fleet_key = $(toml_str "$FLEET_KEY")"; fi
      if [ -n "$FLEET_KEY_FILE" ]; then echo "fleet_key_file = \"fleet.pub\""; fi
      if [ -n "$DEVICE_ID" ]; then echo "device_id = $(toml_str "$DEVICE_ID")"; fi
      printf 'tags = ['
      sep=""
      set -f
      for t in $TAGS; do printf '%s"%s"' "$sep" "$t"; sep=", "; done
      set +f
      echo "]"
      if [ -n "$PASSWORD_FILE" ]; then
        echo "username = $(toml_str "$DEVICE_ID")"
        echo "password_file = \"mqtt-password\""
      fi
      if [ -n "$CA_FILE" ]; then echo "ca_file = \"fleet-ca.pem\""; fi
    fi
  } > "$SC/device.toml"
fi

if [ "$BIN_RUNS" = 1 ]; then
  if has_cmd "$REL/outpost" device check-config; then
    if ! "$REL/outpost" device check-config --config "$SC/device.toml" > "$STAGE/check.out" 2>&1; then
      cat "$STAGE/check.out" >&2
      if [ "$KEEP_CONFIG" = 1 ]; then
        die "the existing $CONF_DIR/device.toml is not valid for this release (above); fix it or give --force-config: nothing was installed"
      fi
      die "the device configuration does not check (above): nothing was installed"
    fi
    say "  config: $CONF_DIR/device.toml checks with \`outpost device check-config\`$( [ "$KEEP_CONFIG" = 0 ] || echo ' (kept)')"
  else
    warn "this release's outpost has no \`device check-config\`: the configuration was checked by this script's rules only"
  fi
else
  warn "the binary does not run on this host: \`outpost device check-config\` is skipped; the configuration was checked by this script's rules only (run the check on the device)"
fi
if [ ! -f "$SC/trust.toml" ]; then
  warn "no trust store (--trust FILE): the device will not start until $CONF_DIR/trust.toml exists (\`outpost key trust\` writes one)"
fi

# --- installing --------------------------------------------------------------------------------
say "Installing into ${ROOT:-this system}"
ensure_user
make_dir /usr/local/bin 0755 "$( [ "$LIVE" = 1 ] && echo root:root || echo 0:0)"
ensure_dir "$CONF_DIR" 0750 "$OWN_ROOT_GROUP"
ensure_dir "$STATE_DIR" 0750 "$OWN_USER"
place "$REL/outpost" "$BIN_DEST" 0755 "$( [ "$LIVE" = 1 ] && echo root:root || echo 0:0)"
for f in trust.toml fleet.pub mqtt-password fleet-ca.pem; do
  if [ "$KEEP_CONFIG" = 1 ]; then
    case $f in
      trust.toml) [ -n "$TRUST" ] || continue ;;
      fleet.pub) [ -n "$FLEET_KEY_FILE" ] || continue ;;
      mqtt-password) [ -n "$PASSWORD_FILE" ] || continue ;;
      fleet-ca.pem) [ -n "$CA_FILE" ] || continue ;;
    esac
  fi
  [ ! -f "$SC/$f" ] || place "$SC/$f" "$CONF_DIR/$f" 0640 "$OWN_ROOT_GROUP"
done
if [ "$KEEP_CONFIG" = 1 ]; then
  say "  $CONF_DIR/device.toml exists: kept"
else
  place "$SC/device.toml" "$CONF_DIR/device.toml" 0640 "$OWN_ROOT_GROUP"
fi

if [ "$LIVE" = 1 ] && [ "$NO_SYSTEMD" = 1 ] && [ ! -d /run/systemd/system ]; then
  say "  no systemd: start it with your init system as user $USER_NAME:"
  say "    $BIN_DEST device run --config $CONF_DIR/device.toml"
else
  make_dir /etc/systemd/system 0755 "$( [ "$LIVE" = 1 ] && echo root:root || echo 0:0)"
  place "$REL/$UNIT_NAME" "$UNIT_DEST" 0644 "$( [ "$LIVE" = 1 ] && echo root:root || echo 0:0)"
  if [ "$LIVE" = 0 ]; then
    make_dir "$WANTS_DIR" 0755 0:0
    link=$ROOT$WANTS_DIR/$UNIT_NAME
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$UNIT_DEST" ]; then
      say "  $WANTS_DIR/$UNIT_NAME is in place (enabled)"
    else
      act "enable: link $WANTS_DIR/$UNIT_NAME -> $UNIT_DEST" ln -sfn "$UNIT_DEST" "$link"
    fi
  else
    act "systemctl daemon-reload" systemctl daemon-reload
    act "systemctl enable $UNIT_NAME" systemctl enable "$UNIT_NAME"
    if [ "$NO_START" = 0 ]; then
      act "systemctl restart $UNIT_NAME" systemctl restart "$UNIT_NAME"
    fi
  fi
fi

if [ "$DRY" = 1 ]; then
  say "dry run: nothing was changed"
else
  say "Installed. $( [ "$LIVE" = 1 ] && echo "Status: systemctl status $UNIT_NAME; logs: journalctl -u $UNIT_NAME" || echo "The unit starts when the image boots.")"
fi
