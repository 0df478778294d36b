#!/usr/bin/env bash
# The main job: the whole story on one machine, with a real call-proxy-server on
# embedded SQLite and real tv-agent processes carrying real voice media (RTP/Opus over
# UDP) between them:
#   TV 1001 calls TV 2002 while 2002 is off (the call is cached); 2002 powers on and
#   shows the missed call with 1001's current state; 2002 calls 1001 back; a few seconds
#   of two-way audio (a 440 Hz tone one way, 1000 Hz the other); hang-up; call log.
# Usage: bash scripts/demo.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
bash scripts/setup.sh
cargo build --release --locked -p call-proxy-server -p tv-agent

data="${1:-target/demo-data}"
rm -rf "$data"
mkdir -p "$data"
bin=target/release
port=$(free_port 17600)
server="127.0.0.1:$port"

"$bin/call-proxy-server" serve --listen "$server" --db "$data/call-proxy.sqlite" 2>"$data/server.log" &
server_pid=$!
answer_pid=""
cleanup() {
  [ -n "$answer_pid" ] && kill "$answer_pid" 2>/dev/null || true
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT
wait_for_port "$port"

step() { printf '\n== %s\n' "$*"; }

step "call-proxy-server on $server, database $data/call-proxy.sqlite"

step "TV 2002 is set up (first power-on), then switched off"
"$bin/tv-agent" missed --user 2002 --server "$server"

step "TV 1001 calls 2002, which is off: the server caches the call"
"$bin/tv-agent" call --user 1001 --server "$server" --to 2002 --audio-in tone:440 --audio-out null || true

step "TV 1001 is on and waiting for calls"
"$bin/tv-agent" answer --user 1001 --server "$server" --seconds 4 --wait 30 \
  --audio-in tone:440 --audio-out "wav:$data/1001-heard.wav" >"$data/1001-answer.json" &
answer_pid=$!
sleep 1

step "TV 2002 powers on and shows the calls it missed, with each caller's state now (user_netstate 1 = online)"
"$bin/tv-agent" missed --user 2002 --server "$server"

step "The viewer on 2002 calls 1001 back; four seconds of two-way audio; hang-up"
"$bin/tv-agent" call --user 2002 --server "$server" --to 1001 --seconds 4 \
  --audio-in tone:1000 --audio-out "wav:$data/2002-heard.wav"
wait "$answer_pid" || true
answer_pid=""
echo "TV 1001's side:"
cat "$data/1001-answer.json"

step "What each TV heard (sox)"
for tv in 1001 2002; do
  freq=$(sox "$data/$tv-heard.wav" -n stat 2>&1 | awk -F: '/Rough   frequency/ {gsub(/ /, "", $2); print $2}')
  len=$(sox "$data/$tv-heard.wav" -n stat 2>&1 | awk -F: '/Length/ {gsub(/ /, "", $2); print $2}')
  echo "TV $tv heard ${len}s of audio at about ${freq} Hz ($data/$tv-heard.wav)"
done

step "Call log (user_call)"
"$bin/call-proxy-server" calls --db "$data/call-proxy.sqlite"
echo
echo "demo complete"
