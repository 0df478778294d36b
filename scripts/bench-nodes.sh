#!/usr/bin/env bash
# Call set-up between two nodes vs on one node, side by side in one run: two
# `call-proxy-server serve` nodes on one PostgreSQL database (a throwaway cluster on this
# machine, fsync and synchronous_commit on), the load generator's TVs registered on node
# A only (same-node: every call between two TVs of node A, node B alive and idle) or
# alternately on A and B (cross-node: every call from a TV of one node to a TV of the
# other), alternating, ROUNDS times. Prints dial -> Ringing and dial -> IncomingCall
# quantiles of every run, then the medians side by side.
#
# Usage: scripts/bench-nodes.sh [ROUNDS] [call-proxy-loadgen flags...]
#   --tvs must be a multiple of 2 x --dial-pairs, so that every caller's callee is on
#   the other node in the cross-node runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
shift || true
flags=("$@")
[ "${#flags[@]}" -gt 0 ] || flags=(--tvs 2048 --dial-pairs 64 --dials 10000 --cached 1000 --boot-samples 1)

echo "== machine: $(nproc) cpus, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "== load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --locked -p call-proxy-server >/dev/null
pg=$(mktemp -d /tmp/tvcall-bench-pg.XXXXXX)
work=$(mktemp -d /tmp/tvcall-bench.XXXXXX)
node_b=
cleanup() {
  [ -n "$node_b" ] && kill "$node_b" 2>/dev/null && wait "$node_b" 2>/dev/null
  bash scripts/pg-cluster.sh stop "$pg"
  rm -rf "$work"
}
trap cleanup EXIT
bash scripts/pg-cluster.sh start "$pg" >"$work/pg.env" 2>"$work/pg.log" || { cat "$work/pg.log"; exit 1; }
. "$work/pg.env"
echo "== PostgreSQL: $("$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/postgres" --version)"
pw=$CALL_PROXY_TEST_PG_PASSWORD_FILE
psql_admin() { PGPASSWORD=$(cat "$pw") psql "$CALL_PROXY_TEST_PG" -qAtc "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "== loadgen flags: ${flags[*]}"
results="$work/results"
: >"$results"
for round in $(seq "$rounds"); do
  for mode in same cross; do
    name="bench_nodes_${round}_$mode"
    psql_admin "CREATE DATABASE $name"
    url="${CALL_PROXY_TEST_PG%/postgres}/$name"
    port=$(free_port)
    mkdir -p "$work/b-$name"
    target/release/call-proxy-server serve --insecure-plaintext --listen "127.0.0.1:$port" \
      --db "$url" --db-password-file "$pw" --data-dir "$work/b-$name" \
      --node-id node-b --node-slot 2 >"$work/b-$name/log" 2>&1 &
    node_b=$!
    for _ in $(seq 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      sleep 0.1
    done
    other=()
    [ "$mode" = cross ] && other=(--other-server "127.0.0.1:$port")
    out=$(target/release/call-proxy-loadgen --work-dir "$work" --db "$url" --db-password-file "$pw" \
      --server-arg=--node-id --server-arg=node-a --server-arg=--node-slot --server-arg=1 \
      "${other[@]}" "${flags[@]}" --json | grep "^{" | tail -1)
    kill "$node_b"; wait "$node_b" 2>/dev/null || true
    node_b=
    if grep -q " ERROR " "$work/b-$name/log"; then
      echo "node B logged errors:"; grep " ERROR " "$work/b-$name/log" | head -5
    fi
    echo "$mode $out" >>"$results"
    python3 - "$mode" "$round" "$out" <<'EOF'
import json, sys
m, r, f = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"round {r} {m:5}-node: dial->Ringing p50 {f['dial_p50_ms']:6.2f} p99 {f['dial_p99_ms']:6.2f} ms  "
      f"dial->IncomingCall p99 {f['ring_p99_ms']:6.2f} ms  {f['dials_per_s']:7.0f} dials/s  errors {f['errors']}")
EOF
  done
done
python3 - "$results" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    mode, js = line.split(" ", 1)
    runs.setdefault(mode, []).append(json.loads(js))
med = lambda mode, k: statistics.median(r[k] for r in runs[mode])
print("== medians          same-node  cross-node")
for k, label in [("dial_p50_ms", "dial p50 ms"), ("dial_p99_ms", "dial p99 ms"),
                 ("ring_p99_ms", "ring p99 ms"), ("dials_per_s", "dials/s")]:
    print(f"   {label:14} {med('same', k):10.2f} {med('cross', k):11.2f}")
EOF
