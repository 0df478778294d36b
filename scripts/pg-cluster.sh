#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests and benchmarks: Debian's PostgreSQL
# (installed if missing), initdb'd into a fresh directory and started as the `postgres`
# user (PostgreSQL refuses to run as root), listening on 127.0.0.1 only, with a role
# `tvcall` that logs in with a SCRAM password read from a file (as a deployment does).
#
#   eval "$(bash scripts/pg-cluster.sh start DIR)"   # prints the exports below
#   bash scripts/pg-cluster.sh stop DIR
#   bash scripts/pg-cluster.sh pause DIR     # stops PostgreSQL, keeps its data
#   bash scripts/pg-cluster.sh resume DIR    # starts it again on the same port
#
# `start` prints CALL_PROXY_TEST_PG (the URL, no password in it) and
# CALL_PROXY_TEST_PG_PASSWORD_FILE; the tests give each server its own database in this
# cluster. `stop` stops the cluster and removes DIR.
set -euo pipefail

cmd=${1:?usage: pg-cluster.sh start|stop|pause|resume DIR}
dir=${2:?usage: pg-cluster.sh start|stop|pause|resume DIR}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

pg_bin() {
  local b
  b=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$b" ] && echo "$b"
}

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else $SUDO runuser -u postgres -- "$@"; fi
}

case "$cmd" in
start)
  if ! pg_bin >/dev/null || [ ! -x "$(pg_bin)/postgres" ]; then
    echo "pg-cluster: installing Debian's postgresql" >&2
    $SUDO apt-get update -qq >&2 || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      postgresql >&2
  fi
  bin=$(pg_bin)
  # A cluster left by an interrupted run is stopped and replaced.
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate stop >&2 || true
  fi
  rm -rf "$dir"
  mkdir -p "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
  printf '%s\n' "$password" >"$dir/password"
  chmod 600 "$dir/password"
  printf '%s\n' "$password" >"$dir/initpw"
  chown postgres "$dir" "$dir/initpw" 2>/dev/null || true
  # The superuser is `tvcall` itself: the tests create one database per server.
  as_postgres "$bin/initdb" -D "$dir/data" -U tvcall --pwfile="$dir/initpw" \
    --auth-host=scram-sha-256 --auth-local=scram-sha-256 -E UTF8 --no-instructions >&2
  rm -f "$dir/initpw"
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $port"
    echo "unix_socket_directories = '$dir'"
    echo "max_connections = 400"
    echo "shared_buffers = 128MB"
    echo "fsync = on"
    echo "synchronous_commit = on"
    echo "log_min_messages = warning"
  } >>"$dir/data/postgresql.conf"
  as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 start >&2
  echo "export CALL_PROXY_TEST_PG='postgres://tvcall@127.0.0.1:$port/postgres'"
  echo "export CALL_PROXY_TEST_PG_PASSWORD_FILE='$dir/password'"
  ;;
stop)
  bin=$(pg_bin || true)
  if [ -n "$bin" ] && [ -f "$dir/data/postmaster.pid" ]; then
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >&2 ||
      as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate stop >&2 || true
  fi
  rm -rf "$dir"
  ;;
pause)
  as_postgres "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >&2
  ;;
resume)
  as_postgres "$(pg_bin)/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 start >&2
  ;;
*)
  echo "usage: pg-cluster.sh start|stop|pause|resume DIR" >&2
  exit 2
  ;;
esac
