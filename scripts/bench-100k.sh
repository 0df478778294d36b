#!/usr/bin/env bash
# 100,000 TVs connected at once across several nodes (issue 18): NODES
# `call-proxy-server serve` nodes on one PostgreSQL database (a throwaway cluster on this
# machine), one load generator per node (the 20,000-descriptor limit holds per process:
# a node and a load generator each hold one end of TVS/NODES connections), all
# registering at the same time, then holding their TVs connected and heartbeating every
# 30 s for HOLD seconds. Half-way through the hold the database is asked how many TVs are
# online; at the end each load generator reports its node's memory per idle TV. Plain
# TCP (the load generator's TVs are not enrolled).
#
# Usage: scripts/bench-100k.sh [TVS] [NODES] [HOLD]   (defaults 100000 6 90)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tvs=${1:-100000}
nodes=${2:-6}
hold=${3:-90}
per=$(((tvs + nodes - 1) / nodes))
echo "== machine: $(nproc) cpus, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), open files $(ulimit -Hn)"
echo "== $tvs TVs over $nodes nodes ($per each), held $hold s; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --locked -p call-proxy-server >/dev/null
pg=$(mktemp -d /tmp/tvcall-bench-pg.XXXXXX)
work=$(mktemp -d /tmp/tvcall-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bash scripts/pg-cluster.sh stop "$pg"
  rm -rf "$work"
}
trap cleanup EXIT
bash scripts/pg-cluster.sh start "$pg" >"$work/pg.env" 2>"$work/pg.log" || { cat "$work/pg.log"; exit 1; }
. "$work/pg.env"
pw=$CALL_PROXY_TEST_PG_PASSWORD_FILE
psql_admin() { PGPASSWORD=$(cat "$pw") psql "$CALL_PROXY_TEST_PG" -qAtc "$1"; }
psql_admin "CREATE DATABASE bench_100k"
url="${CALL_PROXY_TEST_PG%/postgres}/bench_100k"
psql_db() { PGPASSWORD=$(cat "$pw") psql "$url" -qAtc "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
printf 'node_lease_ms = 10000\nrequests_per_sec = 100000\nrequest_burst = 100000\n' >"$work/node.toml"

ports=()
node_pids=()
for i in $(seq "$nodes"); do
  port=$(free_port)
  mkdir -p "$work/n$i"
  target/release/call-proxy-server serve --insecure-plaintext --listen "127.0.0.1:$port" \
    --config "$work/node.toml" --db "$url" --db-password-file "$pw" --data-dir "$work/n$i" \
    --node-id "node-$i" --node-slot "$i" --max-per-ip 0 --max-unregistered-per-ip 100000 \
    >"$work/n$i/log" 2>&1 &
  pids+=($!)
  node_pids+=($!)
  ports+=("$port")
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
done
echo "== $nodes nodes listening"
started=$SECONDS
gens=()
for i in $(seq "$nodes"); do
  target/release/call-proxy-loadgen --server "127.0.0.1:${ports[$((i - 1))]}" \
    --server-pid "${node_pids[$((i - 1))]}" --tvs "$per" --concurrency 64 \
    --user-base $((1000000 + i * 1000000)) --idle-only --hold-secs "$hold" \
    --phase-timeout-secs 600 --json >"$work/g$i.out" 2>&1 &
  gens+=($!)
  pids+=($!)
done
# The most TVs online at once, by the database, every 5 s while the load generators run.
online=0
online_at=0
while :; do
  running=0
  for g in "${gens[@]}"; do kill -0 "$g" 2>/dev/null && running=$((running + 1)); done
  [ "$running" -gt 0 ] || break
  n=$(psql_db "SELECT count(*) FROM user_property WHERE user_netstate = 1" || echo 0)
  if [ "$n" -gt "$online" ]; then online=$n; online_at=$((SECONDS - started)); fi
  sleep 5
done
echo "== most TVs online at once in the database: $online, $online_at s after the start"
failed=0
for g in "${gens[@]}"; do wait "$g" || failed=$((failed + 1)); done
python3 - "$work" "$nodes" "$online" "$tvs" <<'EOF'
import json, sys
work, nodes, online, tvs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
total = 0
per_tv = []
for i in range(1, nodes + 1):
    lines = [l for l in open(f"{work}/g{i}.out") if l.startswith("{")]
    if not lines:
        out = open(f"{work}/g{i}.out").read().splitlines()
        said = [l for l in out if "panicked" in l or "rror" in l][:5] or out[-5:]
        print(f"node-{i}: no result:\n  " + "\n  ".join(said))
        continue
    f = json.loads(lines[-1])
    total += f.get("held_tvs", 0)
    per_tv.append(f["bytes_per_idle_tv"])
    print(f"node-{i}: {f['held_tvs']} TVs held, {f['registrations_per_s']:.0f} registrations/s, "
          f"{f['bytes_per_idle_tv']:.0f} B per idle TV, RSS held {f.get('rss_held_bytes', 0) / 2**20:.1f} MiB, "
          f"{f['heartbeat_rounds']} heartbeat round(s), errors {f['errors']}")
print(f"== all: {total} TVs held ({online} online at once in the database, goal {tvs}); "
      f"memory per idle TV {min(per_tv):.0f}-{max(per_tv):.0f} B" if per_tv else "== no results")
EOF
[ "$failed" -eq 0 ] || { echo "== $failed load generator(s) failed"; for i in $(seq "$nodes"); do tail -3 "$work/g$i.out"; done; exit 1; }
