#!/usr/bin/env bash
# Benchmarks call-proxy-server: builds the release binaries and runs the load generator
# against a freshly spawned server (fresh database in a temporary directory).
#
# Usage: scripts/bench-server.sh [call-proxy-loadgen flags...]
#   scripts/bench-server.sh                                  # the default run: 10,000 TVs
#   scripts/bench-server.sh --tvs 1000 --dials 2000 --cached 5000   # a quick run
#   scripts/bench-server.sh --tvs 19000 --json               # the largest that fits 20,000 fds
#   scripts/bench-server.sh --help                           # every flag
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== machine"
echo "cpus: $(nproc)"
echo "cpu model: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)"
echo "memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "kernel: $(uname -sr)"
echo "open files: soft $(ulimit -Sn), hard $(ulimit -Hn)"
echo "rustc: $(rustc --version)"
echo "load average now: $(cut -d" " -f1-3 /proc/loadavg) (other work on the machine skews the figures)"

echo "== build"
cargo build --release --locked -p call-proxy-server

bin="${CARGO_TARGET_DIR:-target}/release/call-proxy-loadgen"
echo "== run: $bin $*"
exec "$bin" "$@"
