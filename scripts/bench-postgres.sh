#!/usr/bin/env bash
# PostgreSQL vs SQLite, side by side in one run: the load generator against a server on
# a new SQLite file and against one on a new PostgreSQL database (a throwaway cluster on
# this machine, fsync on, synchronous_commit on: every reply after a durable commit),
# alternating, ROUNDS times. Prints registrations/s, durably cached calls/s, dial p99 and
# memory per idle TV of every run, then the PostgreSQL/SQLite ratios of the medians.
#
# Usage: scripts/bench-postgres.sh [ROUNDS] [call-proxy-loadgen flags...]
#   scripts/bench-postgres.sh 3 --tvs 10000 --dials 10000 --cached 50000 --boot-samples 3
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
shift || true
flags=("$@")
[ "${#flags[@]}" -gt 0 ] || flags=(--tvs 10000 --dials 10000 --cached 50000 --boot-samples 3)

echo "== machine: $(nproc) cpus, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "== load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --locked -p call-proxy-server >/dev/null
pg=$(mktemp -d /tmp/tvcall-bench-pg.XXXXXX)
work=$(mktemp -d /tmp/tvcall-bench.XXXXXX)
trap 'bash scripts/pg-cluster.sh stop "$pg"; rm -rf "$work"' EXIT
bash scripts/pg-cluster.sh start "$pg" >"$work/pg.env" 2>"$work/pg.log" || { cat "$work/pg.log"; exit 1; }
. "$work/pg.env"
echo "== PostgreSQL: $("$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/postgres" --version)"
pw=$CALL_PROXY_TEST_PG_PASSWORD_FILE
psql_admin() { PGPASSWORD=$(cat "$pw") psql "$CALL_PROXY_TEST_PG" -qAtc "$1"; }
echo "== loadgen flags: ${flags[*]}"
results="$work/results"
: >"$results"
for round in $(seq "$rounds"); do
  for backend in sqlite postgres; do
    db=()
    if [ "$backend" = postgres ]; then
      psql_admin "CREATE DATABASE bench_$round"
      db=(--db "${CALL_PROXY_TEST_PG%/postgres}/bench_$round" --db-password-file "$pw")
    fi
    out=$(target/release/call-proxy-loadgen --work-dir "$work" "${db[@]}" "${flags[@]}" --json | grep "^{" | tail -1)
    echo "$backend $out" >>"$results"
    python3 - "$backend" "$round" "$out" <<'EOF'
import json, sys
b, r, f = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"round {r} {b:8}: {f['registrations_per_s']:8.0f} registrations/s  "
      f"{f['cached_per_s']:8.0f} cached calls/s  dial p99 {f['dial_p99_ms']:6.2f} ms  "
      f"{f['bytes_per_idle_tv']:6.0f} B/idle TV  errors {f['errors']}")
EOF
  done
done
python3 - "$results" <<'EOF'
import json, statistics, sys
runs = {"sqlite": [], "postgres": []}
for line in open(sys.argv[1]):
    b, j = line.split(" ", 1)
    runs[b].append(json.loads(j))
print("== medians (PostgreSQL / SQLite)")
for key, what in [("registrations_per_s", "registrations/s"), ("cached_per_s", "cached calls/s"),
                  ("dial_p99_ms", "dial p99 ms")]:
    s = statistics.median(r[key] for r in runs["sqlite"])
    p = statistics.median(r[key] for r in runs["postgres"])
    print(f"{what:16} sqlite {s:9.2f}  postgres {p:9.2f}  ratio {p / s:5.2f}")
EOF
