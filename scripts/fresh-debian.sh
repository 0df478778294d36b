#!/usr/bin/env bash
# The fresh-machine check: proves that the README's commands work on a minimal Debian 12.
# Builds a minbase Debian 12 root with debootstrap (from the mirror the host's apt uses),
# gives it only what the network needs (the host's own CA certificates, for
# update-ca-certificates to add once setup.sh installs ca-certificates; resolv.conf; the
# host's Debian apt sources) and a standard /etc/hosts, clones this checkout's HEAD into
# it and runs the README's test command there (`bash scripts/test.sh`) in a chroot, as
# root with a clean environment: the root installs its own tools and Rust through
# scripts/setup.sh and fetches its crates from crates.io itself.
#
# Every run starts from a pristine minbase root, unpacked from a tarball of debootstrap's
# output cached in $FRESH_DEBIAN_CACHE (default /var/cache/fresh-debian; delete it to
# bootstrap again). Downloaded .deb files are kept there too, as a download cache only:
# every package is still chosen, unpacked and configured by setup.sh in the new root.
# Crates are not shared with the host: the root downloads them from crates.io itself,
# which is what proves that its CA certificates and network set-up work.
#
# The build in the root is not incremental (CARGO_INCREMENTAL=0, as CI builds usually are):
# it is built once, and the incremental caches would only take disk.
#
# Usage: bash scripts/fresh-debian.sh [--demo] [--keep]
#   --demo   run `bash scripts/demo.sh` after the tests
#   --keep   keep the root afterwards (its path is printed) instead of deleting it
# Environment: FRESH_DEBIAN_TIMEOUT (seconds for each command in the root,
#   default 2700; one test run took 20 minutes on 2 busy cores),
#   FRESH_DEBIAN_CACHE, FRESH_DEBIAN_WORK (where roots are made, default /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

demo=0
keep=0
for arg in "$@"; do
  case "$arg" in
    --demo) demo=1 ;;
    --keep) keep=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "fresh-debian: unknown argument $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

say() { printf '\nfresh-debian: %s\n' "$*"; }
die() {
  echo "fresh-debian: $*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, mount and chroot)"
suite=bookworm
arch=$(dpkg --print-architecture)
cache="${FRESH_DEBIAN_CACHE:-/var/cache/fresh-debian}"
limit="${FRESH_DEBIAN_TIMEOUT:-2700}"
work="${FRESH_DEBIAN_WORK:-/var/tmp}"
started=$(date +%s)

# The Debian mirror the host's apt uses for $suite: one-line sources (sources.list,
# *.list) and deb822 ones (*.sources), the first `deb` entry of the suite wins.
host_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v s="$suite" '$1 == "deb" {
        i = 2
        if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == s) { print $i; exit }
      }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; enabled = "yes"
        for (k = 1; k <= NF; k++) {
          if ($k ~ /^#/) continue
          if ($k ~ /^Types:/) types = " " substr($k, 7) " "
          if ($k ~ /^URIs:/) uris = substr($k, 6)
          if ($k ~ /^Suites:/) suites = " " substr($k, 8) " "
          if ($k ~ /^Enabled:/) enabled = substr($k, 9)
        }
        gsub(/[ \t]+/, " ", types); gsub(/[ \t]+/, " ", suites); gsub(/[ \t]/, "", enabled)
        if (enabled != "no" && types ~ / deb / && suites ~ (" " s " ")) {
          split(uris, u, " "); if (u[1] != "") { print u[1]; exit }
        }
      }' "$f"
  done
}
mirror=$(host_mirror | sed -n 1p)
[ -n "$mirror" ] || die "found no 'deb' source for $suite in the host's /etc/apt/sources.list{,.d}"

if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap on the host"
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
fi

# A pristine minbase root, bootstrapped once per mirror and kept as a tarball.
mkdir -p "$cache/archives/partial"
key=$(printf '%s %s %s' "$suite" "$arch" "$mirror" | md5sum | cut -c1-12)
tarball="$cache/minbase-$suite-$arch-$key.tar"
# The root with its tools, crates and debug build takes about 6 GB; the demo's release
# build more. Say so plainly rather than fail half-way with "No space left on device".
need_kb=$((10 * 1024 * 1024))
avail_kb=$(df -Pk "$work" | awk 'NR == 2 { print $4 }')
[ "${avail_kb:-0}" -ge "$need_kb" ] ||
  die "needs 10 GB free in $work (FRESH_DEBIAN_WORK), has $((${avail_kb:-0} / 1024 / 1024)) GB"
root=$(realpath "$(mktemp -d "$work/fresh-debian.XXXXXX")")

mounted=()
child=""
unmount_all() {
  local i p
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
    child=""
  fi
  # Whatever still runs inside the root was started by this run: end it, so nothing
  # holds the mounts.
  for p in /proc/[0-9]*; do
    if [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ]; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  # What the tests mounted inside the root themselves (`ip netns add` binds /run/netns
  # and each namespace's file there): off first, deepest first.
  local m
  grep -o " $root/[^ ]*" /proc/mounts 2>/dev/null | sed 's/^ //' | sort -r |
    while read -r m; do
      case "$m" in "$root/run/"* | "$root/var/run/"*) umount -l "$m" 2>/dev/null || true ;; esac
    done
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" 2>/dev/null ||
      echo "fresh-debian: could not unmount ${mounted[i]}" >&2
  done
  mounted=()
}
cleanup() {
  local rc=$?
  unmount_all
  if grep -q " $root/" /proc/mounts; then
    echo "fresh-debian: mounts remain under $root; not deleting it" >&2
  elif [ "$keep" -eq 1 ]; then
    echo "fresh-debian: root kept at $root"
  else
    rm -rf --one-file-system "$root"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ ! -s "$tarball" ]; then
  say "bootstrapping a minbase Debian $suite ($arch) from $mirror (cached as $tarball)"
  t0=$(date +%s)
  boot=$(mktemp -d "$work/fresh-debian-boot.XXXXXX")
  if ! timeout 1800 debootstrap --variant=minbase --arch="$arch" "$suite" "$boot" "$mirror" \
    >"$cache/debootstrap.log" 2>&1; then
    tail -30 "$cache/debootstrap.log" >&2
    rm -rf --one-file-system "$boot"
    die "debootstrap failed (log: $cache/debootstrap.log)"
  fi
  rm -f "$boot"/var/cache/apt/archives/*.deb
  tar -C "$boot" --numeric-owner -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
  rm -rf --one-file-system "$boot"
  echo "bootstrapped in $(($(date +%s) - t0)) s"
fi

say "unpacking a pristine root into $root"
tar -C "$root" --numeric-owner -xpf "$tarball"
# The root's / for every user (_apt, ...): mktemp made it 0700, and so would the tarball.
chmod 755 "$root"

# What the host's network needs, and nothing a fresh machine would lack on its own: the
# host's local CA certificates go where update-ca-certificates reads them, so the bundle
# exists only once setup.sh has installed ca-certificates (a regression there still
# fails here, as it would on any fresh machine).
if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
# The host's Debian sources (a Debian 12 install has the suite, -updates and -security),
# those whose signing keys the root has; otherwise debootstrap's single mirror line stays.
copied=0
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -s "$f" ] || continue
  ok=1
  keys=$(grep -oiE 'signed-by[=:][[:space:]]*[^][:space:],]+' "$f" | sed -E 's/^[^=:]*[=:][[:space:]]*//' || true)
  for k in $keys; do [ -e "$root$k" ] || ok=0; done
  [ -n "$keys" ] || grep -qF "$mirror" "$f" || ok=0
  [ "$ok" -eq 1 ] || continue
  mkdir -p "$root$(dirname "$f")"
  cp "$f" "$root$f"
  copied=$((copied + 1))
done
if [ "$copied" -gt 0 ] && [ ! -e /etc/apt/sources.list ]; then
  rm -f "$root/etc/apt/sources.list"
fi

bind() { # bind SOURCE TARGET-IN-ROOT
  mkdir -p "$root$2"
  mount --bind "$1" "$root$2"
  mounted+=("$root$2")
  mount --make-rslave "$root$2" 2>/dev/null || true
}
# The root is a mount point of its own, as a real system's / is: `ip netns exec` and
# `ip -n` (the NAT tests) make / a slave mount in their new mount namespace, which fails
# with EINVAL when / is a plain directory. First, so the mounts below sit on top of it.
mount --bind "$root" "$root" && mounted+=("$root")
mount -t proc proc "$root/proc" && mounted+=("$root/proc")
mount -t sysfs sysfs "$root/sys" && mounted+=("$root/sys")
bind /dev /dev
bind /dev/pts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm" && mounted+=("$root/dev/shm")
bind "$cache/archives" /var/cache/apt/archives

head=$(git -C "$repo" rev-parse HEAD)
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ] ||
  echo "fresh-debian: note: uncommitted changes are not tested, only HEAD $head"
say "cloning $repo at $head into the root's /root/repo"
git clone -q --no-checkout "$repo" "$root/root/repo"
git -C "$root/root/repo" fetch -q origin "$head"
git -C "$root/root/repo" -c advice.detachedHead=false checkout -q --detach "$head"

steps=("bash scripts/test.sh")
[ "$demo" -eq 0 ] || steps+=("bash scripts/demo.sh")
results=()
status=0
for step in "${steps[@]}"; do
  say "running '$step' in the root (time limit ${limit} s)"
  t0=$(date +%s)
  rc=0
  # In the background and waited for, so that a signal to this script stops it at once
  # (the EXIT trap ends it and whatever it started in the root).
  timeout --kill-after=30 "$limit" env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0 \
    chroot "$root" /bin/bash -c "cd /root/repo && $step" </dev/null &
  child=$!
  wait "$child" || rc=$?
  child=""
  took=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    results+=("passed  $step  (${took} s)")
  else
    [ "$rc" -eq 124 ] && rc="124: timed out"
    results+=("FAILED  $step  (exit $rc, ${took} s)")
    status=1
    break
  fi
done

say "summary: minbase Debian $suite from $mirror, commit $head"
printf '  %s\n' "${results[@]}"
echo "  total $(($(date +%s) - started)) s"
[ "$status" -eq 0 ] && echo "fresh-debian: passed" || echo "fresh-debian: FAILED"
exit "$status"
