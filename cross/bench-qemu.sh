#!/usr/bin/env bash
# Benchmarks the ARM agent under qemu-user against the x86 server: stripped binary size,
# RSS idle and in a call (of the qemu process: guest plus emulator), and power-on to
# cached calls shown under emulation vs natively (whole `tv-agent missed` processes).
# Usage: cross/bench-qemu.sh armv7|aarch64 [samples]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/lib.sh
arm_target "${1:-}" || { echo "usage: cross/bench-qemu.sh armv7|aarch64 [samples]" >&2; exit 2; }
samples=${2:-20}
bash cross/build.sh "$1" >/dev/null
cargo build --release --locked -p call-proxy-server -p tv-agent 2>/dev/null
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $($qemu --version | head -1)"
arm_bin="target/$triple/release/tv-agent"
echo "stripped $triple binary: $(stat -c %s "$arm_bin") bytes"

work=$(mktemp -d)
port=$(free_port 17660)
server="127.0.0.1:$port"
target/release/call-proxy-server serve --insecure-plaintext --listen "$server" --db "$work/db.sqlite" 2>"$work/server.log" &
server_pid=$!
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  kill -TERM "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_for_port "$port"

median_ms() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m/1e6}'; }
time_missed() { # command...
  for i in $(seq "$samples"); do
    s=$(date +%s%N); "$@" missed --user $((7000 + i)) --server "$server" --insecure-plaintext >/dev/null; e=$(date +%s%N)
    echo $((e - s))
  done
}
native=$(time_missed target/release/tv-agent | median_ms)
emulated=$(time_missed "$qemu" "$arm_bin" | median_ms)
echo "power-on to cached calls shown and powered off (whole process, median of $samples): native ${native} ms, under qemu ${emulated} ms, ratio $(awk -v a="$emulated" -v b="$native" 'BEGIN {printf "%.1f", a/b}')x"

rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
"$qemu" "$arm_bin" run --user 7100 --server "$server" --insecure-plaintext --audio-in null --audio-out null \
  --control-listen 127.0.0.1:0 2>/dev/null &
idle_pid=$!; pids+=("$idle_pid")
sleep 3
echo "idle RSS under qemu (guest + emulator): $(rss "$idle_pid") kB"
kill -TERM "$idle_pid"; wait "$idle_pid" 2>/dev/null || true

"$qemu" "$arm_bin" answer --user 7200 --server "$server" --insecure-plaintext --seconds 6 --wait 30 \
  --audio-in tone:1000 --audio-out null >/dev/null 2>&1 &
ans_pid=$!; pids+=("$ans_pid")
sleep 1.5
target/release/tv-agent call --user 7201 --server "$server" --insecure-plaintext --to 7200 --seconds 6 \
  --audio-in tone:440 --audio-out null >/dev/null &
call_pid=$!; pids+=("$call_pid")
sleep 4
echo "in-call RSS under qemu (guest + emulator): $(rss "$ans_pid") kB; HWM $(awk '/^VmHWM/ {print $2}' /proc/$ans_pid/status) kB"
wait "$call_pid" "$ans_pid" 2>/dev/null || true
