#!/usr/bin/env bash
# The main job: builds the workspace and runs the whole story on this machine with a real
# call-proxy-server on embedded SQLite and simulated TVs over real TCP.
# Usage: bash scripts/demo.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p call-proxy-server --bins
exec target/release/call-proxy-demo "${1:-target/demo-data}"
