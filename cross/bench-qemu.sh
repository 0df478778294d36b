#!/usr/bin/env bash
# Benchmarks the ARM agent under qemu-user against the x86 server: stripped binary size,
# RSS idle and in a call (of the qemu process: guest plus emulator), and power-on to
# cached calls shown under emulation vs natively (whole `tv-agent missed` processes).
# Over TLS 1.3 with enrolled TVs, as in production: each TV is enrolled once through the
# real flow (scripts/lib.sh's enroll_tv: `tv-agent enroll` shows a code, the operator
# approves it), by the native agent (the identity files are the same on every
# architecture), and every mode then runs with --data-dir alone; calls are SRTP.
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
target/release/call-proxy-server serve --listen "$server" --db "$work/db.sqlite" 2>"$work/server.log" &
server_pid=$!
pids=()
cleanup() {
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  kill -TERM "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_for_port "$port"

# Every TV of this run, enrolled at once (one log each), within 60 s.
enroll_agent=(target/release/tv-agent) server_bin=target/release/call-proxy-server db="$work/db.sqlite"
tv_dir() { echo "$work/tv-$1"; }
users=($(seq 7001 $((7000 + samples))) 7100 7200 7201)
for u in "${users[@]}"; do
  (enroll_tv "$u" "$work/tls/ca.crt" "$(tv_dir "$u")") >"$work/enroll-$u.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 600); do
  running=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=1; done
  [ "$running" = 0 ] && break
  sleep 0.1
done
for u in "${users[@]}"; do
  grep -q "\"enrolled\":$u" "$(tv_dir "$u").enroll.json" 2>/dev/null \
    || { echo "TV $u was not enrolled:" >&2; cat "$work/enroll-$u.log" >&2; exit 1; }
done
pids=()
echo "${#users[@]} TVs enrolled over TLS (e.g. $(head -1 "$work/enroll-7100.log"))"

median_ms() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m/1e6}'; }
time_missed() { # command...
  for i in $(seq "$samples"); do
    s=$(date +%s%N); "$@" missed --server "$server" --data-dir "$(tv_dir $((7000 + i)))" >/dev/null; e=$(date +%s%N)
    echo $((e - s))
  done
}
native=$(time_missed target/release/tv-agent | median_ms)
emulated=$(time_missed "$qemu" "$arm_bin" | median_ms)
echo "power-on to cached calls shown and powered off (whole process, median of $samples): native ${native} ms, under qemu ${emulated} ms, ratio $(awk -v a="$emulated" -v b="$native" 'BEGIN {printf "%.1f", a/b}')x"

rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
"$qemu" "$arm_bin" run --server "$server" --data-dir "$(tv_dir 7100)" --audio-in null --audio-out null \
  --control-listen 127.0.0.1:0 2>/dev/null &
idle_pid=$!; pids+=("$idle_pid")
sleep 3
echo "idle RSS under qemu (guest + emulator): $(rss "$idle_pid") kB"
kill -TERM "$idle_pid"; wait "$idle_pid" 2>/dev/null || true

"$qemu" "$arm_bin" answer --server "$server" --data-dir "$(tv_dir 7200)" --seconds 6 --wait 30 \
  --audio-in tone:1000 --audio-out null >/dev/null 2>&1 &
ans_pid=$!; pids+=("$ans_pid")
sleep 1.5
target/release/tv-agent call --server "$server" --data-dir "$(tv_dir 7201)" --to 7200 --seconds 6 \
  --audio-in tone:440 --audio-out null >/dev/null &
call_pid=$!; pids+=("$call_pid")
sleep 4
echo "in-call RSS under qemu (guest + emulator): $(rss "$ans_pid") kB; HWM $(awk '/^VmHWM/ {print $2}' /proc/$ans_pid/status) kB"
wait "$call_pid" "$ans_pid" 2>/dev/null || true
