#!/usr/bin/env bash
# Benchmarks call-proxy-server's connection limits and flood handling (issue 11): a
# spawned server, silent (or registered-but-silent) connections from several loopback
# addresses held by attacker processes while genuine TVs register, then a flood of
# pipelined frames while genuine calls are set up, with the server's CPU use.
#
# Usage: scripts/bench-limits.sh [call-proxy-limitbench flags...]
#   scripts/bench-limits.sh                          # full scale: 20,000 silent from 8 addresses, 50 flooders
#   scripts/bench-limits.sh --silent 4000 --flood-conns 20 --flood-secs 5   # a quick run
#   scripts/bench-limits.sh --mode registered --max-per-ip 2000            # registered-but-silent
#   PROFILE=debug scripts/bench-limits.sh ...        # use the debug build (figures are slower)
#   scripts/bench-limits.sh --help                   # every flag
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/lib.sh
print_machine
echo "open files: soft $(ulimit -Sn), hard $(ulimit -Hn)"

profile="${PROFILE:-release}"
echo "== build ($profile)"
if [ "$profile" = release ]; then
    cargo build --release --locked -p call-proxy-server --bins
else
    cargo build --locked -p call-proxy-server --bins
fi

bin="${CARGO_TARGET_DIR:-target}/$profile/call-proxy-limitbench"
echo "== run: $bin $*"
exec "$bin" "$@"
