#!/usr/bin/env bash
# The main job: the whole story on one machine, with a real call-proxy-server on
# embedded SQLite and real tv-agent processes carrying real voice media (RTP/Opus over
# UDP) between them, over TLS 1.3 with enrolled TVs:
#   TVs 1001 and 2002 are enrolled (each shows a code, the operator approves it);
#   TV 1001 calls TV 2002 while 2002 is off (the call is cached); 2002 powers on and
#   shows the missed call with 1001's current state; 2002 calls 1001 back; a few seconds
#   of two-way audio (a 440 Hz tone one way, 1000 Hz the other); hang-up; another call
#   to 2002 while it is off, and a voice message and a picture left for it, which its
#   on-screen UI shows at power-on (headless Chromium screenshots of the home screen, the
#   messages screen and the picture opened); the call log, messages and statistics
#   through the operator's admin API.
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
admin_port=$(free_port 17680)
admin="http://127.0.0.1:$admin_port"
# The operator's bearer token, made for this run and passed in the environment.
CALL_PROXY_ADMIN_TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
export CALL_PROXY_ADMIN_TOKEN

"$bin/call-proxy-server" serve --listen "$server" --db "$data/call-proxy.sqlite" \
  --admin-listen "127.0.0.1:$admin_port" 2>"$data/server.log" &
server_pid=$!
answer_pid=""
tv_pid=""
cleanup() {
  [ -n "$answer_pid" ] && kill "$answer_pid" 2>/dev/null || true
  [ -n "$tv_pid" ] && kill -TERM "$tv_pid" 2>/dev/null || true
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT
wait_for_port "$port"

step() { printf '\n== %s\n' "$*"; }

step "call-proxy-server on $server (TLS 1.3), database $data/call-proxy.sqlite, TVs trust $data/tls/ca.crt"

enroll_agent=("$bin/tv-agent") server_bin="$bin/call-proxy-server" db="$data/call-proxy.sqlite"
tv() { echo "--server $server --data-dir $data/tv-$1"; }

step "Enrolling the two TVs"
enroll_tv 1001 "$data/tls/ca.crt" "$data/tv-1001"
enroll_tv 2002 "$data/tls/ca.crt" "$data/tv-2002"
echo "Enrollments (the operator's view):"
"$bin/call-proxy-server" enrollments --db "$data/call-proxy.sqlite"

step "A TV without a credential gets nothing: it must be enrolled first (exit 4)"
"$bin/tv-agent" missed --user 2002 --server "$server" --server-ca "$data/tls/ca.crt" \
  --data-dir "$data/stranger" || echo "exit code $?"

step "TV 2002 is set up (first power-on), then switched off"
"$bin/tv-agent" missed $(tv 2002)

step "TV 1001 calls 2002, which is off: the server caches the call"
"$bin/tv-agent" call $(tv 1001) --to 2002 --audio-in tone:440 --audio-out null || true

step "TV 1001 is on and waiting for calls"
"$bin/tv-agent" answer $(tv 1001) --seconds 4 --wait 30 \
  --audio-in tone:440 --audio-out "wav:$data/1001-heard.wav" >"$data/1001-answer.json" &
answer_pid=$!
sleep 1

step "TV 2002 powers on and shows the calls it missed, with each caller's state now (user_netstate 1 = online)"
"$bin/tv-agent" missed $(tv 2002)

step "The viewer on 2002 calls 1001 back; four seconds of two-way audio; hang-up"
"$bin/tv-agent" call $(tv 2002) --to 1001 --seconds 4 \
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

step "TV 1001 calls 2002 again; 2002 is off, so the call is cached"
"$bin/tv-agent" call $(tv 1001) --to 2002 --audio-in tone:440 --audio-out null || true

step "TV 1001 leaves 2002 a voice message (3 s recorded from a 440 Hz tone, Ogg Opus) and a picture"
"$bin/tv-agent" send $(tv 1001) --to 2002 --voice tone:440 --seconds 3
ffmpeg -v error -y -f lavfi -i testsrc=size=640x480 -frames:v 1 "$data/garden.png"
"$bin/tv-agent" send $(tv 1001) --to 2002 --picture "$data/garden.png" --caption "Our garden today"

ui_port=$(free_port 17602)
step "TV 2002 powers on as the TV daemon with its on-screen UI on http://127.0.0.1:$ui_port/"
"$bin/tv-agent" run $(tv 2002) --audio-in null --audio-out null \
  --control-listen "127.0.0.1:$(free_port 17601)" --ui-listen "127.0.0.1:$ui_port" \
  2>"$data/tv-2002.log" &
tv_pid=$!
wait_for_port "$ui_port"
# The daemon takes its messages in at power-on: both bodies saved before it acknowledges.
for _ in $(seq 1 100); do
  [ "$(ls "$data/tv-2002/messages" 2>/dev/null | grep -cv '\.part$\|messages.json')" -ge 2 ] && break
  sleep 0.1
done
sleep 1
# A screenshot of the TV's screen at PAGE (a deep link: "", "#messages", "#message/ID").
screen() {
  timeout 60 chromium --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
    --no-first-run --disable-background-networking --window-size=1920,1080 \
    --timeout=3000 --screenshot="$2" "http://127.0.0.1:$ui_port/$1" >/dev/null 2>&1 || true
  if [ -s "$2" ]; then echo "$3: $2"; else echo "(no screenshot: chromium did not run)"; fi
}
screen "" "$data/tv-2002-screen.png" "The TV's screen (missed-call and message badges, the call from 1001, 1001's state)"
screen "#messages" "$data/tv-2002-messages.png" "Its messages screen (the voice message and the picture from 1001)"
picture_id=$(grep -o '"message_id": *[0-9]*' "$data/tv-2002/messages/messages.json" | head -1 | grep -o '[0-9]*$')
screen "#message/$picture_id" "$data/tv-2002-picture.png" "The picture, opened"
echo "Kept on the TV across restarts: $(cat "$data/tv-2002/missed.json" | tr -d '\n ' | cut -c1-160)…"
echo "Messages kept on the TV ($data/tv-2002/messages):"
ls -l "$data/tv-2002/messages" | tail -n +2
voice=$(ls "$data/tv-2002/messages/"*.opus 2>/dev/null | head -1)
if [ -n "$voice" ]; then
  ffmpeg -v error -y -i "$voice" -ac 1 -ar 48000 "$data/voice-message.wav"
  freq=$(sox "$data/voice-message.wav" -n stat 2>&1 | awk -F: '/Rough   frequency/ {gsub(/ /, "", $2); print $2}')
  len=$(sox "$data/voice-message.wav" -n stat 2>&1 | awk -F: '/Length/ {gsub(/ /, "", $2); print $2}')
  echo "The voice message, decoded by ffmpeg: ${len}s at about ${freq} Hz"
fi
kill -TERM "$tv_pid" && wait "$tv_pid" || true
tv_pid=""

step "The operator's view through the admin API ($admin, bearer token from CALL_PROXY_ADMIN_TOKEN)"
echo "Call log (user_call), newest first:"
"$bin/call-proxy-server" calls --admin "$admin"
echo
echo "Calls still waiting for delivery:"
"$bin/call-proxy-server" calls --admin "$admin" --outcome cached-undelivered
echo
echo "TVs:"
"$bin/call-proxy-server" users --admin "$admin"
echo
echo "Messages (never their contents):"
"$bin/call-proxy-server" messages --admin "$admin" || true
echo
echo "Statistics:"
"$bin/call-proxy-server" stats --admin "$admin"
echo
echo "demo complete"
