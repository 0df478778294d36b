#!/usr/bin/env bash
# Runs the ARM tv-agent under qemu-user against the x86 call-proxy-server and an x86
# agent, over TLS 1.3 with both TVs enrolled through the real flow (the ARM agent makes
# its key and does its TLS under emulation): power on, fetch a cached call, place a live call to the x86 agent with a tone,
# and check that each side hears the other's tone (sox). Prints "N passed, N failed".
# Usage: cross/test-qemu.sh armv7|aarch64   (builds what it needs first)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/lib.sh
arm_target "${1:-}" || { echo "usage: cross/test-qemu.sh armv7|aarch64" >&2; exit 2; }
bash cross/build.sh "$1"
bash scripts/setup.sh >/dev/null
cargo build --release --locked -p call-proxy-server -p tv-agent

work=$(mktemp -d)
port=$(free_port 17650)
server="127.0.0.1:$port"
target/release/call-proxy-server serve --listen "$server" --db "$work/db.sqlite" 2>"$work/server.log" &
server_pid=$!
answer_pid=""
cleanup() {
  [ -n "$answer_pid" ] && kill "$answer_pid" 2>/dev/null || true
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_for_port "$port"

# The ARM binary runs on the host's ARM multiarch glibc (Debian's libc6:armhf/arm64);
# qemu's -L with the cross toolchain's glibc crashes on thread creation under qemu 7.2.
arm_agent=("$qemu" "target/$triple/release/tv-agent")
x86_agent=(target/release/tv-agent)
passed=0 failed=0
check() { # description, condition...
  local what=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok: $what"; else failed=$((failed + 1)); echo "FAILED: $what"; fi
}
freq() { sox "$1" -n stat 2>&1 | awk -F: '/Rough   frequency/ {gsub(/ /, "", $2); print $2}'; }
near() { [ -n "$1" ] && [ "$1" -ge $(($2 * 95 / 100)) ] && [ "$1" -le $(($2 * 105 / 100)) ]; }

# Both TVs are enrolled: the ARM one under emulation, the x86 one natively.
server_bin=target/release/call-proxy-server db="$work/db.sqlite"
enroll_agent=("${arm_agent[@]}")
enroll_tv 7 "$work/tls/ca.crt" "$work/tv-7"
check "ARM TV enrolled over TLS" grep -q '"enrolled":7' "$work/tv-7.enroll.json"
enroll_agent=("${x86_agent[@]}")
enroll_tv 8 "$work/tls/ca.crt" "$work/tv-8"
arm7=(--server "$server" --data-dir "$work/tv-7")
x86_8=(--server "$server" --data-dir "$work/tv-8")

# ARM TV 7 is set up and switched off; x86 TV 8 calls it (cached).
start=$(date +%s%N)
"${arm_agent[@]}" missed "${arm7[@]}" >"$work/boot1.json"
echo "ARM power-on to cached calls shown and powered off: $(( ($(date +%s%N) - start) / 1000000 )) ms (whole process under emulation)"
"${x86_agent[@]}" call "${x86_8[@]}" --to 7 --audio-in null --audio-out null >"$work/cached.json" || true
check "x86 call to the switched-off ARM TV is cached" grep -q '"outcome":"cached"' "$work/cached.json"

# x86 TV 8 waits for calls; the ARM TV powers on, sees the missed call, calls back.
"${x86_agent[@]}" answer "${x86_8[@]}" --seconds 3 --wait 60 \
  --audio-in tone:1000 --audio-out "wav:$work/x86-heard.wav" >"$work/answer.json" &
answer_pid=$!
sleep 1
"${arm_agent[@]}" missed "${arm7[@]}" >"$work/missed.json"
cat "$work/missed.json"
check "ARM TV shows the missed call from 8, with 8 online now" \
  grep -q '"user_id":8,"otheruser_id":7,.*"user_netstate":1' "$work/missed.json"
"${arm_agent[@]}" call "${arm7[@]}" --to 8 --seconds 3 \
  --audio-in tone:440 --audio-out "wav:$work/arm-heard.wav" >"$work/call.json" || true
cat "$work/call.json"
wait "$answer_pid" || true
answer_pid=""
check "ARM call to the x86 TV is answered" grep -q '"outcome":"answered"' "$work/call.json"
f_x86=$(freq "$work/x86-heard.wav" || true)
f_arm=$(freq "$work/arm-heard.wav" || true)
echo "x86 TV heard ${f_x86:-nothing} Hz; ARM TV heard ${f_arm:-nothing} Hz"
check "x86 TV hears the ARM TV's 440 Hz tone" near "${f_x86:-0}" 440
check "ARM TV hears the x86 TV's 1000 Hz tone" near "${f_arm:-0}" 1000
echo "qemu-$1: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
