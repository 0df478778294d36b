# Shell helpers shared by the demo, the ARM emulation test and the benchmarks.
# Source it: . "$root/scripts/lib.sh"

# Prints a free TCP port on 127.0.0.1 (falls back to $1 without python3).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
    2>/dev/null || echo "${1:-17600}"
}

# Waits up to 5 s until something accepts TCP connections on 127.0.0.1:$1.
wait_for_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# Sets $triple (Rust target) and $qemu (the qemu-user binary) for an ARM TV target,
# armv7 or aarch64; returns 1 for anything else.
arm_target() {
  case "$1" in
    armv7) triple=armv7-unknown-linux-gnueabihf qemu=qemu-arm-static ;;
    aarch64) triple=aarch64-unknown-linux-gnu qemu=qemu-aarch64-static ;;
    *) return 1 ;;
  esac
}

# Enrolls a TV through the real flow: the agent ($enroll_agent: an array, the tv-agent
# command, possibly under qemu) asks the server at $server for a code, trusting the CA
# file $2, keeping its key and credential in $3; the operator approves the code for user
# $1 with the server's CLI ($server_bin) on the database $db. Prints each step.
enroll_tv() {
  local user=$1 ca=$2 dir=$3 out="$3.enroll.json"
  "${enroll_agent[@]}" enroll --server "$server" --server-ca "$ca" --data-dir "$dir" >"$out" &
  local pid=$!
  for _ in $(seq 1 300); do [ -s "$out" ] && break; sleep 0.1; done
  echo "TV $user shows: $(head -1 "$out")"
  local code
  code=$(head -1 "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["user_code"])')
  echo "The operator approves code $code for user $user:"
  "$server_bin" approve --db "$db" --code "$code" --user "$user"
  wait "$pid"
  echo "TV $user: $(tail -1 "$out")"
}

# Prints the "== machine" header a benchmark's figures are read against: CPUs, model,
# kernel and the load average now.
print_machine() {
  echo "== machine"
  echo "cpus: $(nproc)"
  echo "cpu model: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)"
  echo "kernel: $(uname -sr)"
  echo "load average now: $(cut -d" " -f1-3 /proc/loadavg) (other work on the machine skews the figures)"
}
