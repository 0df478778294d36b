#!/usr/bin/env bash
# Benchmarks tv-agent (issue 3) against a real call-proxy-server on loopback:
#   a) power-on to registered-and-cached-calls-shown (tv-agent-bench boot, 1 and 100 cached calls)
#   a2) whole-process time of `tv-agent missed` (exec to exit), for context
#   b) idle RSS (and idle CPU) of a registered `tv-agent run`
#   c) CPU per call (% of one core) and RSS in a call, both sides sending looped SPEECH
#      (espeak-ng, 48 kHz mono 16-bit) through real `tv-agent call` / `tv-agent answer`
#   c2) CPU of the media engine alone at Opus complexity 5 and 10 (tv-agent-bench media-cpu)
#   d) software mouth-to-ear latency of the media engine (tv-agent-bench latency)
# Installs espeak-ng and sox if missing (apt-get, as root), builds the release binaries,
# starts the server on a free loopback port with a fresh database in a temporary
# directory, over TLS 1.3 (its own private CA), enrolls every TV the way a TV owner does
# (`tv-agent enroll` shows a code, the operator approves it with `call-proxy-server
# approve`; scripts/lib.sh's enroll_tv), so each call is set up over TLS and its media is
# SRTP; prints the machine and every figure, and stops the server (SIGTERM) at the end.
# Every step has a time limit. Only a) runs against a second, plain-TCP server
# (--insecure-plaintext): tv-agent-bench's boot makes fresh users in-process and has no
# TLS identity to present.
#
# Usage: scripts/bench-agent.sh
# Knobs (environment): BOOT_SAMPLES (20), CALL_SECONDS (20), LATENCY_SECONDS (20).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh

BOOT_SAMPLES="${BOOT_SAMPLES:-20}"
CALL_SECONDS="${CALL_SECONDS:-20}"
LATENCY_SECONDS="${LATENCY_SECONDS:-20}"

echo "== machine"
echo "cpus: $(nproc)"
echo "cpu model: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)"
echo "memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "kernel: $(uname -sr)"
echo "rustc: $(rustc --version)"
echo "load average now: $(cut -d" " -f1-3 /proc/loadavg) (other work on the machine skews the figures)"

echo "== tools"
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v sox >/dev/null 2>&1 || missing+=(sox)
if ((${#missing[@]})); then
    if [[ "$(id -u)" != 0 ]]; then
        echo "need ${missing[*]}: run as root, or install them first" >&2
        exit 1
    fi
    timeout 600 apt-get update
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y --no-install-recommends "${missing[@]}"
fi
echo "espeak-ng: $(espeak-ng --version | head -1)"
echo "sox: $(sox --version | head -1)"

echo "== build"
timeout 1800 cargo build --release --locked -p call-proxy-server -p tv-agent
bindir="${CARGO_TARGET_DIR:-target}/release"
SERVER_BIN="$bindir/call-proxy-server"
AGENT_BIN="$bindir/tv-agent"
BENCH_BIN="$bindir/tv-agent-bench"

work="$(mktemp -d)"
server_pid=""
bg_pids=()

stop_pid() { # stop_pid PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL
    local pid="$1" secs="$2" i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "pid $pid did not stop within ${secs}s: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

plain_pid=""

cleanup() {
    local p
    for p in "${bg_pids[@]}"; do stop_pid "$p" 5; done
    if [[ -n "$plain_pid" ]]; then
        stop_pid "$plain_pid" 10
    fi
    if [[ -n "$server_pid" ]]; then
        stop_pid "$server_pid" 10
        echo "server stopped (SIGTERM)"
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# wait_for FILE PATTERN SECONDS: until FILE contains PATTERN (fails after SECONDS)
wait_for() {
    local file="$1" pattern="$2" secs="$3" i
    for ((i = 0; i < secs * 20; i++)); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "no '$pattern' in $file within ${secs}s:" >&2
    tail -20 "$file" >&2 || true
    return 1
}

cpu_ticks() { # utime + stime of the whole process, in clock ticks
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
status_kb() { # status_kb PID FIELD: e.g. VmRSS in kB
    awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"
}
now() { date +%s.%N; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
pct() { # pct TICKS0 TICKS1 T0 T1: % of one core
    awk -v a="$1" -v b="$2" -v t0="$3" -v t1="$4" -v hz="$(getconf CLK_TCK)" \
        'BEGIN {printf "%.2f", (b - a) / hz / (t1 - t0) * 100}'
}

echo "== speech"
cat >"$work/text.txt" <<'EOF'
Hello, can you hear me? The picture is fine on my side. We watched the match last night,
and the second half was much better than the first. Tomorrow the weather should be dry,
so we could walk to the market in the morning and have lunch by the river. Tell me when
you are free, and I will call you again in the evening after the news.
EOF
timeout 60 espeak-ng -s 150 -f "$work/text.txt" -w "$work/espeak.wav"
timeout 60 sox "$work/espeak.wav" -r 48000 -c 1 -b 16 "$work/one.wav"
one_s="$(soxi -D "$work/one.wav")"
repeats="$(awk -v d="$one_s" 'BEGIN {n = int(30 / d); if (n * d < 30) n++; print n - 1}')"
timeout 60 sox "$work/one.wav" "$work/speech.wav" repeat "$repeats"
speech="$work/speech.wav"
echo "speech: $(soxi -r "$speech") Hz, $(soxi -c "$speech") channel(s), $(soxi -b "$speech") bit, $(soxi -D "$speech") s (espeak-ng text of ${one_s} s, looped)"

echo "== server"
pick_port() { # a free loopback port (not one in $1)
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 40000))
        if [[ "$p" != "${1:-}" ]] && ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "no free port found" >&2
    return 1
}
started_pid=""
start_server() { # start_server PORT DB LOG [serve options...]: $started_pid once it listens
    local port="$1" db="$2" log="$3" i
    shift 3
    RUST_LOG=warn "$SERVER_BIN" serve --listen "127.0.0.1:$port" --db "$db" "$@" 2>"$log" &
    started_pid=$!
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        kill -0 "$started_pid" 2>/dev/null || { cat "$log" >&2; return 1; }
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$port" >&2
    return 1
}
port="$(pick_port)"
server="127.0.0.1:$port"
# TLS 1.3: the server makes its private CA under $work/tls/ before its port opens.
start_server "$port" "$work/db.sqlite" "$work/server.log"
server_pid="$started_pid"
ca="$work/tls/ca.crt"
echo "call-proxy-server pid $server_pid on $server (TLS 1.3, TVs trust $ca), database $work/db.sqlite (defaults: durable commits)"

base=1000 # a fresh database every run: any user ids are new

echo "== enrolling the TVs (each shows a code, the operator approves it)"
# enroll_tv's settings (scripts/lib.sh): the agent, the operator's CLI, the database.
enroll_agent=("$AGENT_BIN") server_bin="$SERVER_BIN" db="$work/db.sqlite"
tv_dir() { echo "$work/tv-$1"; }
a2_users=($(seq $((base + 101)) $((base + 110))))
idle_user=$((base + 1))
caller=$((base + 2))
callee=$((base + 3))
# All at once (each enrollment waits for the server's poll interval), one log each,
# within 60 s.
enroll_pids=()
for u in "${a2_users[@]}" "$idle_user" "$caller" "$callee"; do
    (enroll_tv "$u" "$ca" "$(tv_dir "$u")") >"$work/enroll-$u.log" 2>&1 &
    enroll_pids+=($!)
done
for ((i = 0; i < 600; i++)); do
    running=0
    for p in "${enroll_pids[@]}"; do kill -0 "$p" 2>/dev/null && running=1; done
    ((running)) || break
    sleep 0.1
done
if ((running)); then
    echo "the enrollments did not finish within 60 s:" >&2
    cat "$work"/enroll-*.log >&2
    # Each subshell's own children (its tv-agent enroll), then the subshell.
    for p in "${enroll_pids[@]}"; do
        pkill -TERM -P "$p" 2>/dev/null || true
        kill -TERM "$p" 2>/dev/null || true
    done
    exit 1
fi
for p in "${enroll_pids[@]}"; do wait "$p" || { cat "$work"/enroll-*.log >&2; exit 1; }; done
for u in "${a2_users[@]}" "$idle_user" "$caller" "$callee"; do
    grep -q "\"enrolled\":$u" "$(tv_dir "$u").enroll.json" || { cat "$work/enroll-$u.log" >&2; exit 1; }
done
cat "$work/enroll-$caller.log"
echo "(and $(( ${#a2_users[@]} + 2 )) more TVs the same way; every TV below runs with --data-dir alone)"

echo "== a) power-on to registered and cached calls shown ($BOOT_SAMPLES samples each)"
# tv-agent-bench boot powers on fresh, never enrolled users in-process over plain TCP:
# against a plain-TCP server of its own (lab mode), not the TLS one.
plain_port="$(pick_port "$port")"
start_server "$plain_port" "$work/plain.sqlite" "$work/plain-server.log" --insecure-plaintext
plain_pid="$started_pid"
echo "(plain-TCP call-proxy-server pid $plain_pid on 127.0.0.1:$plain_port for this step only)"
for k in 1 100; do
    timeout 600 "$BENCH_BIN" boot --server "127.0.0.1:$plain_port" --samples "$BOOT_SAMPLES" --cached "$k" \
        | tee "$work/boot-$k.log" | grep -v '^boot sample' || { cat "$work/boot-$k.log" >&2; exit 1; }
done
stop_pid "$plain_pid" 10
plain_pid=""

echo "== a2) for context: whole process, exec of 'tv-agent missed' to exit (start-up, TLS handshake, register, fetch, ack, Bye), 10 runs"
ms=()
for u in "${a2_users[@]}"; do
    s="$(date +%s%N)"
    timeout 30 "$AGENT_BIN" missed --server "$server" --data-dir "$(tv_dir "$u")" >/dev/null
    e="$(date +%s%N)"
    ms+=("$(awk -v s="$s" -v e="$e" 'BEGIN {printf "%.2f", (e - s) / 1e6}')")
done
printf '%s\n' "${ms[@]}" | sort -n | awk '{v[NR] = $1} END {printf "tv-agent missed, whole process: n=%d min=%.2f p50=%.2f max=%.2f ms\n", NR, v[1], v[int((NR + 1) / 2)], v[NR]}'

echo "== b) idle: registered tv-agent run, 3 s after start"
RUST_LOG=tv_agent=info "$AGENT_BIN" run --server "$server" \
    --audio-in null --audio-out null --control-listen 127.0.0.1:0 --data-dir "$(tv_dir "$idle_user")" \
    2>"$work/idle.log" &
idle_pid=$!
bg_pids+=("$idle_pid")
t_start="$(now)"
wait_for "$work/idle.log" '"event":"cached_calls"' 10
sleep 1
c0="$(cpu_ticks "$idle_pid")"
t0="$(now)"
sleep "$(awk -v s="$t_start" -v n="$(now)" 'BEGIN {d = 3 - (n - s); print (d > 0 ? d : 0)}')"
c1="$(cpu_ticks "$idle_pid")"
t1="$(now)"
idle_rss="$(status_kb "$idle_pid" VmRSS)"
idle_hwm="$(status_kb "$idle_pid" VmHWM)"
stop_pid "$idle_pid" 10
echo "idle: VmRSS $idle_rss kB ($(mib "$idle_rss") MiB), VmHWM $idle_hwm kB ($(mib "$idle_hwm") MiB), CPU $(pct "$c0" "$c1" "$t0" "$t1")% of one core over $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s"

echo "== c) one call, both sides sending speech, ${CALL_SECONDS} s (TLS control link, SRTP media)"
RUST_LOG=tv_agent::agent=debug "$AGENT_BIN" answer --server "$server" --data-dir "$(tv_dir "$callee")" \
    --seconds "$CALL_SECONDS" --wait 30 --audio-in "wav:$speech" --audio-out null \
    >"$work/answer.json" 2>"$work/answer.log" &
answer_pid=$!
bg_pids+=("$answer_pid")
wait_for "$work/answer.log" 'CachedCalls' 10
RUST_LOG=tv_agent::agent=debug "$AGENT_BIN" call --server "$server" --data-dir "$(tv_dir "$caller")" --to "$callee" \
    --seconds "$CALL_SECONDS" --audio-in "wav:$speech" --audio-out null \
    >"$work/call.json" 2>"$work/call.log" &
call_pid=$!
bg_pids+=("$call_pid")
wait_for "$work/answer.log" 'Answered' 10
wait_for "$work/call.log" 'Answered' 10
sleep 0.5
window="$(awk -v s="$CALL_SECONDS" 'BEGIN {print s - 2}')"
a0="$(cpu_ticks "$call_pid")"
b0="$(cpu_ticks "$answer_pid")"
t0="$(now)"
sleep "$(awk -v w="$window" 'BEGIN {print w / 2}')"
call_rss_mid="$(status_kb "$call_pid" VmRSS)"
answer_rss_mid="$(status_kb "$answer_pid" VmRSS)"
sleep "$(awk -v w="$window" -v s="$t0" -v n="$(now)" 'BEGIN {d = w - (n - s); print (d > 0 ? d : 0)}')"
a1="$(cpu_ticks "$call_pid")"
b1="$(cpu_ticks "$answer_pid")"
t1="$(now)"
call_rss_end="$(status_kb "$call_pid" VmRSS)"
answer_rss_end="$(status_kb "$answer_pid" VmRSS)"
call_hwm="$(status_kb "$call_pid" VmHWM)"
answer_hwm="$(status_kb "$answer_pid" VmHWM)"
for p in "$call_pid" "$answer_pid"; do
    for ((i = 0; i < 300; i++)); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
    stop_pid "$p" 5
done
bg_pids=()
span="$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')"
echo "caller (tv-agent call):   CPU $(pct "$a0" "$a1" "$t0" "$t1")% of one core over $span s of the call; VmRSS $call_rss_mid kB mid-call ($(mib "$call_rss_mid") MiB), $call_rss_end kB late; VmHWM $call_hwm kB ($(mib "$call_hwm") MiB)"
echo "callee (tv-agent answer): CPU $(pct "$b0" "$b1" "$t0" "$t1")% of one core over $span s of the call; VmRSS $answer_rss_mid kB mid-call ($(mib "$answer_rss_mid") MiB), $answer_rss_end kB late; VmHWM $answer_hwm kB ($(mib "$answer_hwm") MiB)"
echo "caller result: $(cat "$work/call.json")"
echo "callee result: $(cat "$work/answer.json")"
echo "(clock tick $(getconf CLK_TCK) Hz: ±$(awk -v s="$span" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", 100 / hz / s}') percentage points of resolution)"

echo "== c2) for context: the media engine alone, both ends of a call in one process, speech, Opus complexity 5 (the agent's) and 10"
timeout 120 "$BENCH_BIN" media-cpu --wav "$speech" --seconds 15 --complexity 5,10

echo "== d) software mouth-to-ear latency, ${LATENCY_SECONDS} s"
timeout $((LATENCY_SECONDS + 60)) "$BENCH_BIN" latency --seconds "$LATENCY_SECONDS"

echo "== server log (warnings and errors)"
grep -E 'WARN|ERROR' "$work/server.log" || echo "(none)"
