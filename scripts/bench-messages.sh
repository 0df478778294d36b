#!/usr/bin/env bash
# Benchmarks messages (issue 15) against a spawned call-proxy-server with a durable SQLite
# database: 1 KB texts stored per second, power-on to 20 messages listed and to 20 voice
# messages of ~100 KB saved, a 10 MB body up and down (MB/s, server CPU per MB), server
# memory during concurrent 10 MB uploads, and ring latency to a TV while it uploads.
# The media are real files made by ffmpeg (kept in target/bench-media/): an 18 s Opus
# voice message (~100 KB) and a 20 s 720p H.264 clip at 4 Mbit/s (~10 MB).
#
# Usage: scripts/bench-messages.sh [call-proxy-messagebench flags...]
#   scripts/bench-messages.sh                                   # full run (~2 minutes)
#   scripts/bench-messages.sh --texts-secs 2 --concurrent 10 --dials 50   # a quick run
#   scripts/bench-messages.sh --help                            # every flag
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/lib.sh
print_machine
echo "disk under target/: $(df -h --output=source,fstype target 2>/dev/null | tail -1 || echo unknown)"

command -v ffmpeg >/dev/null || { echo "bench-messages: ffmpeg is needed (scripts/setup.sh installs it)" >&2; exit 1; }
media="${CARGO_TARGET_DIR:-target}/bench-media"
mkdir -p "$media"
if [ ! -s "$media/voice.opus" ]; then
    ffmpeg -hide_banner -loglevel error -y -f lavfi -i "sine=frequency=440:duration=18:sample_rate=48000" \
        -ac 1 -c:a libopus -b:a 32k "$media/voice.opus"
fi
if [ ! -s "$media/clip.mp4" ]; then
    ffmpeg -hide_banner -loglevel error -y -f lavfi -i "testsrc2=size=1280x720:rate=25" -t 20 \
        -c:v libx264 -preset ultrafast -b:v 4M -maxrate 4M -bufsize 8M -pix_fmt yuv420p \
        -movflags +faststart "$media/clip.mp4"
fi
echo "media: $(stat -c '%n %s bytes' "$media/voice.opus" "$media/clip.mp4" | tr '\n' ';')"

echo "== build (release)"
cargo build --release --locked -p call-proxy-server --bins

bin="${CARGO_TARGET_DIR:-target}/release/call-proxy-messagebench"
echo "== run: $bin $*"
exec "$bin" --voice "$media/voice.opus" --clip "$media/clip.mp4" "$@"
