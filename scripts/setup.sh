#!/usr/bin/env bash
# Installs what building, running and testing this workspace needs on a fresh Debian 12
# machine (as root, or through sudo). Safe to run again: it installs only what is missing.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    # A mirror hiccup on one index must not stop the install of the others.
    $SUDO apt-get update -qq || echo "setup: apt-get update reported errors; continuing" >&2
    apt_updated=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
# A minimal Debian 12 (debootstrap --variant=minbase, the debian:12 image) has no CA
# certificates, so cargo could not reach crates.io over HTTPS.
dpkg-query -W -f='${Status}' ca-certificates 2>/dev/null | grep -q 'ok installed' ||
  missing+=(ca-certificates)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v git >/dev/null 2>&1 || missing+=(git)
# Opus is built from source by the opus crate (cmake, which drives make); ALSA headers
# for sound cards; sox and espeak-ng make and check audio in the demo, tests and
# benchmarks.
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
pkg-config --exists alsa 2>/dev/null || missing+=(libasound2-dev)
command -v sox >/dev/null 2>&1 || missing+=(sox)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
# The interoperability test checks that ffmpeg decodes a call's RTP.
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
# The TV UI's browser tests drive Debian's headless Chromium through chromedriver; fonts
# so the screenshots show real text.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
fc-list 2>/dev/null | grep -qi dejavu || missing+=(fonts-dejavu-core)
# The browser tests end chromedriver's process group with kill(1) (procps: the shell's
# builtin is not a program); the demo and the ARM test pick free ports with python3.
type -P kill >/dev/null 2>&1 || missing+=(procps)
command -v python3 >/dev/null 2>&1 || missing+=(python3-minimal)
# The full-disk tests mount a small tmpfs (mount(8), util-linux's `mount` package).
command -v mount >/dev/null 2>&1 || missing+=(mount)
# The NAT tests build homes and an internet from network namespaces (ip), with routers
# doing NAT (nft); coturn is the relay the relayed calls go through.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v turnserver >/dev/null 2>&1 || missing+=(coturn)
# The TV UI page's own tests run under node's built-in test runner.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

# Rust 1.85 or newer. Debian 12's own cargo is too old; its rustc-web/cargo-web are new
# enough and come from the Debian archive.
rust_ok() {
  command -v cargo >/dev/null 2>&1 || return 1
  local v
  v=$(rustc --version 2>/dev/null | awk '{print $2}')
  [ -n "$v" ] && [ "$(printf '%s\n1.85.0\n' "$v" | sort -V | head -n1)" = "1.85.0" ]
}
if ! rust_ok; then
  echo "setup: installing Debian's rustc-web and cargo-web (Rust >= 1.85)"
  apt_install rustc-web cargo-web
fi
rust_ok || { echo "setup: no Rust >= 1.85 available (found: $(rustc --version 2>&1))" >&2; exit 1; }
echo "setup: $(cargo --version), $(rustc --version)"
