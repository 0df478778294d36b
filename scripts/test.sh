#!/usr/bin/env bash
# The test suite: installs what the tests need, starts a throwaway PostgreSQL cluster,
# then runs every test of the workspace (unit, property, and integration tests against
# real servers, sockets, SQLite files and PostgreSQL), the server's integration tests a
# second time with every test server on PostgreSQL, and the TV page's script tests under
# node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The TV page's pure logic (tv-agent/assets/logic.js), with node's built-in test runner
# (Debian's nodejs, node 18 or later); a failing test fails the suite (set -e).
command -v node >/dev/null || { echo "test.sh: node not found (apt-get install nodejs)" >&2; exit 1; }
node --test tv-agent/assets/tests/*.test.js

# PostgreSQL (Debian's, installed if missing) in a directory of its own, stopped and
# removed however the tests end.
pg_dir=$(mktemp -d /tmp/tvcall-pg.XXXXXX)
trap 'bash scripts/pg-cluster.sh stop "$pg_dir"' EXIT
if ! bash scripts/pg-cluster.sh start "$pg_dir" >"$pg_dir.env" 2>"$pg_dir.log"; then
  cat "$pg_dir.log" >&2
  echo "test.sh: cannot start PostgreSQL" >&2
  exit 1
fi
. "$pg_dir.env"
rm -f "$pg_dir.env" "$pg_dir.log"
# A test that needs the cluster fails rather than skips if it is not there.
export CALL_PROXY_TEST_REQUIRE_PG=1

cargo test --workspace --locked
# The whole server suite on the other backend: every test server (flows, bad input,
# SIGKILL durability, operator queries, admin API, trust, limits, compatibility) runs on
# a PostgreSQL database of its own. The SQLite-specific tests (its full disk, its WAL)
# stay on SQLite.
echo "test.sh: the server's integration tests on PostgreSQL"
CALL_PROXY_TEST_BACKEND=postgres cargo test -p call-proxy-server --locked --tests
