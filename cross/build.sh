#!/usr/bin/env bash
# Builds tv-agent for ARM TVs from an x86_64 Debian 12 machine, with Debian's Rust 1.85
# and its ARM standard library, and leaves the stripped binary at
# target/<triple>/release/tv-agent. Installs what it needs (as root, or through sudo).
# Usage: cross/build.sh armv7|aarch64 [CARGO-BUILD-ARGS...]
#   e.g. cross/build.sh armv7 --no-default-features   (no sound card support: the binary
#   then needs nothing but glibc; it still carries Opus media from tone/WAV/null)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# Debian's Rust: the compiler and the ARM standard library must be the same build.
RUST_DEB=1.85.0+dfsg3-1~deb12u3

case "${1:-}" in
  armv7) triple=armv7-unknown-linux-gnueabihf arch=armhf gnu=arm-linux-gnueabihf cflags="-mfpu=neon" ;;
  aarch64) triple=aarch64-unknown-linux-gnu arch=arm64 gnu=aarch64-linux-gnu cflags="" ;;
  *) echo "usage: cross/build.sh armv7|aarch64 [CARGO-BUILD-ARGS...]" >&2; exit 2 ;;
esac
shift

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

installed() { # package [version]
  local v
  v=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null) || return 1
  case "$v" in
    "ii "*) [ -z "${2:-}" ] || [ "${v#ii  }" = "$2" ] ;;
    *) return 1 ;;
  esac
}

pkgs=(
  "rustc-web=$RUST_DEB" "cargo-web=$RUST_DEB" "libstd-rust-web-dev=$RUST_DEB" "libstd-rust-web-1.85=$RUST_DEB"
  "gcc-$gnu" "g++-$gnu" "libc6-dev-$arch-cross" cmake pkg-config "libasound2-dev:$arch" "libc6:$arch"
  qemu-user-static
)
missing=()
for p in "${pkgs[@]}"; do
  name=${p%%=*}
  version=""
  [ "$name" = "$p" ] || version=${p#*=}
  installed "$name" "$version" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "cross: installing ${missing[*]}"
  dpkg --print-foreign-architectures | grep -qx "$arch" || $SUDO dpkg --add-architecture "$arch"
  # The security archive's ARM index is sometimes mid-sync; the main archive has all we need.
  $SUDO apt-get update -qq || echo "cross: apt-get update reported errors; continuing" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    --allow-downgrades "${missing[@]}"
fi

# The ARM standard library, unpacked into a sysroot of our own (installing it through
# apt drags in ARM LLVM and conflicts with the x86 packages).
sysroot="$root/target/cross/sysroot-$arch"
if [ ! -d "$sysroot/usr/lib/rustlib/$triple/lib" ]; then
  echo "cross: unpacking Debian's $arch Rust standard library into $sysroot"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq "libstd-rust-web-dev:$arch=$RUST_DEB" "libstd-rust-web-1.85:$arch=$RUST_DEB")
  mkdir -p "$sysroot"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$sysroot"; done
  rm -rf "$tmp"
fi

T=$(echo "$triple" | tr 'a-z-' 'A-Z_')
t=${triple//-/_}
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export "CARGO_TARGET_${T}_LINKER=$gnu-gcc"
export "CARGO_TARGET_${T}_RUSTFLAGS=--sysroot=$sysroot/usr"
export "CC_$t=$gnu-gcc" "CXX_$t=$gnu-g++" "AR_$t=$gnu-ar" "CFLAGS_$t=$cflags" "CXXFLAGS_$t=$cflags"
export PKG_CONFIG_ALLOW_CROSS=1 "PKG_CONFIG_LIBDIR=/usr/lib/$gnu/pkgconfig"
# The TV's release profile: small, whole-program optimised, stripped. opt-level z (not s):
# with ICE/STUN/TURN (issue 13) the armv7 agent was 4,418,596 bytes at s (4,123,588 before),
# 3,963,940 at z, inside the 4 MiB goal; the media hot path is Opus, C built with $cflags,
# which z does not touch.
export CARGO_PROFILE_RELEASE_OPT_LEVEL=z CARGO_PROFILE_RELEASE_LTO=fat \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_DEBUG=false \
  CARGO_PROFILE_RELEASE_STRIP=true

echo "cross: $(/usr/bin/rustc --version) building tv-agent for $triple"
cd "$root"
/usr/bin/cargo build --release --locked -p tv-agent --bin tv-agent --target "$triple" "$@"
bin="target/$triple/release/tv-agent"
echo "cross: $bin: $(stat -c %s "$bin") bytes"
