# Shell helpers shared by the demo, the ARM emulation test and the ARM benchmark.
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
