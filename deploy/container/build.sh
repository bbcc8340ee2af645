#!/usr/bin/env bash
# Builds the Outpost container images without a Docker daemon, with buildah (or podman).
#
#   deploy/container/build.sh [OPTIONS] fleet|device BINARY
#
# BINARY is a static outpost build for the image's architecture, made elsewhere:
#   fleet:  cargo build --release --locked -p outpost-cli --target x86_64-unknown-linux-musl
#   device: the same with --no-default-features (device-only)
# The architecture of the image is read from the binary (x86_64, aarch64, armv7).
#
# Options:
#   --version V      the image's version label and tag (default: the binary's --version, when
#                    it runs here, else 0.0.0-dev)
#   --revision REV   the revision label (default: git rev-parse HEAD)
#   --name NAME      the image name (default: localhost/outpost-fleet or localhost/outpost-device)
#   --allow-dynamic  accept a dynamically linked binary, copying the shared libraries that ldd
#                    lists into the image: for trying the images with a dev build on the build
#                    host only, never for a release
#   --print-context  lay out the build context, print its path, and build nothing
#
# It prints the image reference (NAME:VERSION-ARCH) on its last line. It says plainly when
# neither buildah nor podman can build here, and exits 3 then.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

die() { echo "build.sh: error: $*" >&2; exit 1; }
version="" revision="" name="" allow_dynamic=0 print_context=0
while [ $# -gt 0 ]; do
  case $1 in
    --version) version=$2; shift 2 ;;
    --revision) revision=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --allow-dynamic) allow_dynamic=1; shift ;;
    --print-context) print_context=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[ $# -eq 2 ] || die "usage: build.sh [OPTIONS] fleet|device BINARY (see --help)"
kind=$1 binary=$2
case $kind in fleet|device) ;; *) die "the image is fleet or device, not $kind" ;; esac
[ -f "$binary" ] || die "$binary: no such file"

# The image's architecture, from the ELF header (e_machine, bytes 18-19).
case $(od -An -tx1 -j18 -N2 "$binary" | tr -d ' \n') in
  3e00) arch=amd64 variant="" ;;
  b700) arch=arm64 variant="" ;;
  2800) arch=arm variant=v7 ;;
  *) die "$binary is not an x86_64, aarch64 or armv7 ELF binary" ;;
esac

# Static or not: a dynamic binary names its program interpreter.
command -v readelf >/dev/null || die "readelf (binutils) is needed to tell a static binary from a dynamic one"
dynamic=0
if readelf -lW "$binary" | grep -q 'Requesting program interpreter'; then dynamic=1; fi
if [ "$dynamic" = 1 ] && [ "$allow_dynamic" = 0 ]; then
  die "$binary is dynamically linked: an image on an empty base needs a static (musl) build, e.g. --target x86_64-unknown-linux-musl (or --allow-dynamic to try a dev build here)"
fi

if [ -z "$version" ]; then
  version=$("$binary" --version 2>/dev/null | awk '{ print $2 }') || true
  [ -n "$version" ] || version=0.0.0-dev
fi
[ -n "$revision" ] || revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$name" ] || name=localhost/outpost-$kind
ref="$name:$version-$arch${variant}"

# --- the build context -------------------------------------------------------------------------
ctx=$(mktemp -d "${TMPDIR:-/tmp}/outpost-image.XXXXXX")
[ "$print_context" = 1 ] || trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/var/lib" "$ctx/state" "$ctx/rootfs/run" "$ctx/rootfs/tmp"
# Mount points only: with a read-only root the runtime cannot create them (podman mounts
# tmpfs and secrets under /run and /tmp; Kubernetes mounts what the pod asks for).
chmod 1777 "$ctx/rootfs/tmp"
install -m 0755 "$binary" "$ctx/rootfs/outpost"
home=/var/lib/outpost; [ "$kind" = fleet ] && home=/var/lib/outpost-fleet
printf 'root:x:0:0:root:/:/sbin/nologin\noutpost:x:65532:65532:outpost:%s:/sbin/nologin\n' "$home" > "$ctx/rootfs/etc/passwd"
printf 'root:x:0:\noutpost:x:65532:\n' > "$ctx/rootfs/etc/group"
ca=""
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
  [ -f "$f" ] && { ca=$f; break; }
done
if [ -n "$ca" ]; then
  install -m 0644 "$ca" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
else
  echo "build.sh: warning: no CA bundle on this host; the image trusts no system roots (give ca_file / --broker-ca-file)" >&2
fi
if [ "$kind" = device ]; then
  install -d -m 0755 "$ctx/rootfs/etc/outpost"
  install -m 0644 "$here/device.toml" "$ctx/rootfs/etc/outpost/device.toml"
fi
if [ "$dynamic" = 1 ]; then
  echo "build.sh: warning: $binary is dynamically linked; copying its libraries (a test image, not a release)" >&2
  # ldd lines: "libx.so => /path (0x...)" and the loader "/lib64/ld-linux-x86-64.so.2 (0x...)".
  ldd "$binary" | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }' | while read -r lib; do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
fi
cp "$here/Containerfile.$kind" "$ctx/Containerfile"
if [ "$print_context" = 1 ]; then echo "$ctx"; exit 0; fi

# --- build -------------------------------------------------------------------------------------
builder=""
if command -v buildah >/dev/null 2>&1; then builder=buildah
elif command -v podman >/dev/null 2>&1; then builder=podman
else
  echo "build.sh: cannot build: neither buildah nor podman is installed (Debian: apt-get install buildah)" >&2
  exit 3
fi
args=(--format docker --arch "$arch" --os linux --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
  --file "$ctx/Containerfile" --tag "$ref")
[ -z "$variant" ] || args+=(--variant "$variant")
# SOURCE_DATE_EPOCH (set by the release workflow) gives reproducible timestamps where the
# builder supports it (buildah 1.33 and later); older ones ignore the variable.
if [ "$builder" = buildah ]; then
  set +e; buildah bud "${args[@]}" "$ctx" >&2; rc=$?; set -e
else
  set +e; podman build "${args[@]}" "$ctx" >&2; rc=$?; set -e
fi
if [ "$rc" != 0 ]; then
  echo "build.sh: cannot build here: $builder exited $rc (above)" >&2
  exit 3
fi
echo "$ref"
