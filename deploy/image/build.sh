#!/usr/bin/env bash
# Build Tidegate's container image: a static (musl) release binary and the
# bundled functions on an empty base (see Containerfile).
#
#   deploy/image/build.sh [TAG]        TAG defaults to localhost/tidegate:<version>
#
# Needs rustup, musl-tools and podman (installed when missing, with apt-get,
# as root or through sudo). Prints the image's size at the end. Cargo's
# target directory is $CARGO_TARGET_DIR, or target/ in the repository.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

musl=x86_64-unknown-linux-musl
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
tag="${1:-localhost/tidegate:$version}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
    || { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
}
command -v musl-gcc >/dev/null 2>&1 || apt_install musl-tools
command -v podman >/dev/null 2>&1 || apt_install podman runc
command -v readelf >/dev/null 2>&1 || apt_install binutils
rustup target add "$musl" wasm32-wasip2 >/dev/null

echo "== building the static binary ($musl, release)"
cargo build --release --locked --target "$musl" --bin tidegate
binary="$target_dir/$musl/release/tidegate"
# The guest functions the binary bundles, built beside it by functions/bundled.
functions="$target_dir/$musl/wasm-functions/wasm32-wasip2/release"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
rootfs="$context/rootfs"
install -d -m 0755 "$rootfs/usr/local/bin" "$rootfs/etc/tidegate/tls" "$rootfs/usr/share/tidegate/functions"
install -m 0755 "$binary" "$rootfs/usr/local/bin/tidegate"
strip "$rootfs/usr/local/bin/tidegate"
# Static (static-pie): an ELF file with no program interpreter, nothing
# to load from a base (readelf fails on anything that is not ELF).
headers="$(readelf -lW "$rootfs/usr/local/bin/tidegate")"
if grep -q 'Requesting program interpreter' <<<"$headers"; then
  echo "build.sh: $binary is dynamically linked; the image has no libraries" >&2
  exit 1
fi
install -m 0644 "$here/tidegate.toml" "$rootfs/etc/tidegate/tidegate.toml"
for function in echo chat router authorizer; do
  install -m 0644 "$functions/$function.wasm" "$rootfs/usr/share/tidegate/functions/$function.wasm"
done
# Names for the ids, so that tools and logs show them.
printf 'root:x:0:0:root:/:/sbin/nologin\ntidegate:x:65532:65532:Tidegate:/var/lib/tidegate:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\ntidegate:x:65532:\n' >"$rootfs/etc/group"
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
install -d -m 0700 "$context/state"
cp "$here/Containerfile" "$context/Containerfile"

echo "== building the image $tag"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then revision="$revision-dirty"; fi
podman build --quiet --pull=never --no-cache \
  --label org.opencontainers.image.title=tidegate \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.revision="$revision" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label org.opencontainers.image.source=https://github.com/tidegate/tidegate \
  --tag "$tag" "$context" >/dev/null

size="$(podman image inspect --format '{{.Size}}' "$tag")"
echo "image $tag: $((size / 1024 / 1024)) MiB ($size bytes); binary $(($(stat -c %s "$rootfs/usr/local/bin/tidegate") / 1024 / 1024)) MiB stripped"
