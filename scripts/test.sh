#!/usr/bin/env bash
# The test suite: installs what the tests need, then runs every test of the workspace
# (unit, property, and integration tests against real servers, sockets and SQLite files).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --locked
