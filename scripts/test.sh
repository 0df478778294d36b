#!/usr/bin/env bash
# The test suite: installs what the tests need, then runs every test of the workspace
# (unit, property, and integration tests against real servers, sockets and SQLite files),
# and the TV page's script tests under node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The TV page's pure logic (tv-agent/assets/logic.js), with node's built-in test runner
# (Debian's nodejs, node 18 or later); a failing test fails the suite (set -e).
command -v node >/dev/null || { echo "test.sh: node not found (apt-get install nodejs)" >&2; exit 1; }
node --test tv-agent/assets/tests/*.test.js
cargo test --workspace --locked
