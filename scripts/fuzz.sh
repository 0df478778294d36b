#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time, then replays every
# regression input in fuzz/regressions/<target>/ through its target, so bugs the fuzzer
# once found stay fixed. Exits non-zero if any target crashes, times out, runs out of
# memory or fails to build. Prints one line per target (runs, runs per second, corpus).
#
# Works on stable Rust (rustup's, or Debian 12's rustc-web 1.85 from scripts/setup.sh):
# the targets are built with `--sanitizer none`, so no nightly and no -Z flag is needed.
# The coverage instrumentation cargo-fuzz adds (-Cpasses=sancov-module and
# -Cllvm-args=-sanitizer-coverage-*) is made of stable -C options; libfuzzer-sys compiles
# libFuzzer from its C++ source with the system's g++. The decoders are safe Rust, so
# AddressSanitizer would add little; debug assertions and overflow checks are on (-a),
# so arithmetic overflow on a peer's value is a crash. Without a sanitizer libFuzzer's
# -malloc_limit_mb has no hooks, so the run is also held to an address-space limit
# (ulimit -v): an allocation sized by a forged length fails and aborts, a crash.
#
# Installs cargo-fuzz (from crates.io, `cargo install --locked`) if it is missing.
# Build artefacts stay in fuzz/target (git-ignored; about 2 GB), the corpus the fuzzer
# grows in fuzz/target/corpus/<target>/ (the committed seeds in fuzz/corpus/<target>/
# are only read), crash inputs in fuzz/artifacts/<target>/.
#
# Usage: bash scripts/fuzz.sh [SECONDS] [TARGET...]
#   SECONDS  fuzzing time per target (default 30; 0: only build and replay regressions)
#   TARGET   only these targets (default: every target in fuzz/Cargo.toml)
# Environment: FUZZ_RSS_MB (libFuzzer's -rss_limit_mb, default 2048),
#   FUZZ_JOBS (cargo build jobs, default cargo's).
# A crash: its input is in fuzz/artifacts/<target>/; reproduce it with the command the
# script prints, fix it, and keep the input as fuzz/regressions/<target>/<name>.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
shift || true
case "$secs" in
  '' | *[!0-9]*)
    echo "fuzz: SECONDS must be a whole number, not '$secs'" >&2
    exit 2
    ;;
esac
rss_mb="${FUZZ_RSS_MB:-2048}"
say() { printf 'fuzz: %s\n' "$*"; }

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export CARGO_TERM_COLOR=never
if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz 0.13.1 (the newest whose lock file builds on Rust 1.85)"
  cargo install cargo-fuzz --version 0.13.1 --locked
fi

# -O: optimised; -a: debug assertions and overflow checks; no sanitizer (stable Rust).
flags=(--fuzz-dir fuzz --sanitizer none --release --debug-assertions)
jobs=()
[ -n "${FUZZ_JOBS:-}" ] && jobs=(--jobs "$FUZZ_JOBS")

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
[ "${#targets[@]}" -gt 0 ] || {
  echo "fuzz: no fuzz targets found" >&2
  exit 1
}

say "building the fuzz targets ($(cargo fuzz --version), $(rustc --version))"
cargo fuzz build "${flags[@]}" "${jobs[@]}"

logs=fuzz/target/fuzz-logs
mkdir -p "$logs"
# The file targets write their input to a scratch directory (tmpfs when there is one:
# the agent's loaders fsync), removed at the end.
shm=/dev/shm
[ -d "$shm" ] && [ -w "$shm" ] || shm="${TMPDIR:-/tmp}"
TV_FUZZ_TMP=$(mktemp -d "$shm/tv-fuzz.XXXXXX")
export TV_FUZZ_TMP
trap 'rm -rf "$TV_FUZZ_TMP"' EXIT
failed=()

# Runs one libFuzzer process for target $1 with the remaining arguments; its output goes
# to the log file $LOG. Memory: libFuzzer's RSS limit, and an address-space limit twice
# that (the instrumented binaries reserve little beyond their heap).
run_target() {
  local target=$1
  shift
  (
    ulimit -v $((rss_mb * 2 * 1024))
    cargo fuzz run "${flags[@]}" "$target" "$@"
  ) >"$LOG" 2>&1
}

# The value of libFuzzer's final statistic $2 in log $1 (empty if absent).
stat() { sed -n "s/^stat::$2: *//p" "$1" | tail -n1; }

for target in "${targets[@]}"; do
  seeds="fuzz/corpus/$target"
  work="fuzz/target/corpus/$target"
  mkdir -p "$seeds" "$work"
  if [ "$secs" -gt 0 ]; then
    LOG="$logs/$target.log"
    # New inputs go to the first corpus directory (the work one); the seeds are read.
    if run_target "$target" "$work" "$seeds" -- \
      -max_total_time="$secs" -rss_limit_mb="$rss_mb" -timeout=10 \
      -print_final_stats=1; then
      runs=$(stat "$LOG" number_of_executed_units)
      rate=$(stat "$LOG" average_exec_per_sec)
      corp=$(grep -o 'corp: [0-9]*' "$LOG" | tail -n1 | sed 's/corp: //')
      say "$target: ok, ${runs:-?} runs in ${secs}s (${rate:-?}/s), corpus ${corp:-?} inputs ($(find "$seeds" -type f | wc -l) seeds)"
    else
      say "$target: FAILED; the end of $LOG:"
      grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' "$LOG" | tail -n 40 | sed 's/^/    /'
      for a in fuzz/artifacts/"$target"/*; do
        [ -f "$a" ] || continue
        say "  input: $a"
        say "  reproduce: cargo fuzz run ${flags[*]} $target $a"
      done
      failed+=("$target")
    fi
  fi

  # Every regression input, replayed once through its target.
  regressions=()
  if [ -d "fuzz/regressions/$target" ]; then
    mapfile -t regressions < <(find "fuzz/regressions/$target" -type f | sort)
  fi
  if [ "${#regressions[@]}" -gt 0 ]; then
    LOG="$logs/$target.regressions.log"
    if run_target "$target" "${regressions[@]}" -- -rss_limit_mb="$rss_mb" -timeout=10; then
      say "$target: ${#regressions[@]} regression inputs pass"
    else
      say "$target: a regression input FAILED; the end of $LOG:"
      tail -n 30 "$LOG" | sed 's/^/    /'
      failed+=("$target (regressions)")
    fi
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all ${#targets[@]} targets passed"
