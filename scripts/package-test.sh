#!/usr/bin/env bash
# The Debian packages, tested the way an operator deploys them: builds the
# call-proxy-server and tv-agent .debs (cargo-deb, release), installs them with dpkg,
# checks their files, conffiles and systemd units (systemd-analyze verify and security),
# then runs the packaged server exactly as its unit would (its ExecStart, packaged
# config, LimitNOFILE, an unprivileged dynamic-range user, the state directory and the
# admin-token credential laid out as systemd lays them, PrivateTmp, ProtectHome and a
# read-only root for ProtectSystem=strict, in a mount namespace of its own) against
# test TVs: TV 1001 (a scripted tv-agent) is enrolled with the packaged operator CLI on
# the packaged database; TV 2002 is the packaged agent run as its own unit would run it
# with /etc/default/tv-agent, activated through the admin API, seen online, switched
# off; 1001 calls it (cached); 2002 is switched on and the call is delivered; then
# SIGTERM, and the server must exit 0 within the unit's TimeoutStopSec. Finally both
# packages are purged and nothing may be left. Cleans up on failure too (trap), and
# can run again at once.
#
# There is no systemd as PID 1 here, so the unit is not started with systemctl: what
# the emulation cannot enforce is checked instead: every system call and socket family
# the services used (strace -f) against SystemCallFilter= and RestrictAddressFamilies=,
# and the units themselves with systemd-analyze verify and security. An ARM agent
# binary left by cross/build.sh is packaged and its package checked too.
#
# Usage (as root): bash scripts/package-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

[ "$(id -u)" = 0 ] || { echo "package-test: run as root (it installs packages)" >&2; exit 1; }

CARGO_DEB_VERSION=3.8.0
pkgs=(call-proxy-server tv-agent)
# (= /lib/systemd/system on Debian 12, whose /lib is a link to usr/lib)
units=/usr/lib/systemd/system
marker=/var/tmp/tvcall-package-test.marker
server_port=7600 admin_port=7680 ui_port=7602 control_port=7601
admin="http://127.0.0.1:$admin_port"
started=$(date +%s)

step() { printf '\n== %s\n' "$*"; }
fail() {
  echo "package-test: FAILED: $*" >&2
  exit 1
}

# ---------------------------------------------------------------- tools and build
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v python3 >/dev/null || need+=(python3)
command -v readelf >/dev/null && command -v objcopy >/dev/null || need+=(binutils)
command -v strace >/dev/null || need+=(strace)
command -v setpriv >/dev/null && command -v unshare >/dev/null && command -v prlimit >/dev/null ||
  need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

step "Building the packages (cargo deb, release)"
# One build for both (the same as the demo's and the benchmarks'), then cargo-deb
# packages it: stripped binaries in the .deb, their line tables in a -dbgsym.ddeb.
cargo build --release --locked -p call-proxy-server -p tv-agent
debs=()
for p in "${pkgs[@]}"; do
  # cargo-deb prints the paths of what it made on stdout; its progress goes to stderr.
  deb=$(cargo deb -p "$p" --locked --no-build | grep '\.deb$' | tail -1) || fail "cargo deb -p $p"
  [ -f "$deb" ] || fail "cargo deb -p $p made no package ($deb)"
  echo "$deb ($(du -h "$deb" | cut -f1))"
  debs+=("$deb")
done
# The agent for ARM TVs, when cross/build.sh (or cross/test-qemu.sh) has left its
# stripped binary: packaged too, and checked (architecture, dependencies, ELF machine),
# but not installed here.
for arm in armv7-unknown-linux-gnueabihf:armhf:ARM aarch64-unknown-linux-gnu:arm64:AArch64; do
  IFS=: read -r triple arch machine <<<"$arm"
  [ -x "target/$triple/release/tv-agent" ] || continue
  deb=$(cargo deb -p tv-agent --locked --no-build --no-strip --no-dbgsym --target "$triple" |
    grep '\.deb$' | tail -1) || fail "cargo deb -p tv-agent --target $triple"
  [ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || fail "$deb is not $arch"
  x=$(mktemp -d)
  dpkg-deb -x "$deb" "$x"
  m=$(readelf -h "$x/usr/bin/tv-agent" 2>/dev/null | sed -n 's/^ *Machine: *//p') || true
  rm -rf "$x"
  [ "$m" = "$machine" ] || fail "$deb holds a $m binary, not $machine"
  echo "$deb ($(du -h "$deb" | cut -f1); $arch, $m; depends: $(dpkg-deb -f "$deb" Depends))"
done

# ---------------------------------------------------------------- clean state
status_of() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true; }
for p in "${pkgs[@]}"; do
  s=$(status_of "$p")
  if [ -n "$s" ] && [ "$s" != not-installed ]; then
    # Only a package an earlier run of this test left behind is purged: an operator's
    # real installation (and its database) is never touched.
    [ -e "$marker" ] || fail "$p is installed on this machine ($s); this test installs and purges it: remove it first"
    echo "purging $p left by an earlier run"
    dpkg --purge "$p" >/dev/null
  fi
done
for port in $server_port $admin_port $ui_port $control_port; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "port $port is in use (the packaged configs use 7600, 7680, 7601 and 7602)"
  fi
done

work=$(mktemp -d /tmp/tvcall-package-test.XXXXXX)
made_private="" made_credentials=""
[ -d /var/lib/private ] || made_private=1
[ -d /run/credentials ] || made_credentials=1
pids=()
ok=""
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -z "$ok" ]; then
    for f in "$work"/*.log "$work"/*.out; do
      [ -s "$f" ] && { echo "--- $f (last lines)"; tail -20 "$f"; }
    done
  fi
  for p in "${pkgs[@]}"; do
    s=$(status_of "$p")
    [ -n "$s" ] && [ "$s" != not-installed ] && dpkg --purge "$p" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
  [ -n "$made_private" ] && rmdir /var/lib/private 2>/dev/null || true
  [ -n "$made_credentials" ] && rmdir /run/credentials 2>/dev/null || true
  rm -f "$marker"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
echo $$ >"$marker"

# ---------------------------------------------------------------- install and check
step "Installing with dpkg -i"
dpkg -i "${debs[@]}" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
for f in /usr/bin/call-proxy-server /etc/tvcall/server.toml $units/call-proxy-server.service \
  /usr/share/doc/call-proxy-server/README.md /usr/bin/tv-agent /etc/default/tv-agent \
  $units/tv-agent.service; do
  dpkg -S "$f" >/dev/null 2>&1 || fail "$f is not in a package"
  [ -f "$f" ] || fail "$f is missing"
done
dpkg-query -W -f='${Conffiles}\n' call-proxy-server | grep -q ' /etc/tvcall/server.toml ' ||
  fail "/etc/tvcall/server.toml is not a conffile"
dpkg-query -W -f='${Conffiles}\n' tv-agent | grep -q ' /etc/default/tv-agent ' ||
  fail "/etc/default/tv-agent is not a conffile"
[ "$(stat -c '%a %U' /etc/tvcall/admin.token)" = "600 root" ] ||
  fail "/etc/tvcall/admin.token should be 600 root: $(stat -c '%a %U' /etc/tvcall/admin.token)"
[ -L /etc/systemd/system/multi-user.target.wants/call-proxy-server.service ] ||
  fail "the package did not enable call-proxy-server.service"
echo "files, conffiles, admin token (600 root), service enabled: ok"
# Installing over itself runs the maintainer scripts as an upgrade does: the operator's
# changes to a conffile and the admin token must survive it.
token_before=$(cat /etc/tvcall/admin.token)
echo "# changed by package-test" >>/etc/tvcall/server.toml
dpkg -i "${debs[@]}" >>"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i over itself"; }
grep -q '^# changed by package-test$' /etc/tvcall/server.toml || fail "reinstalling lost a change to server.toml"
[ "$(cat /etc/tvcall/admin.token)" = "$token_before" ] || fail "reinstalling replaced the admin token"
echo "installed over itself: the changed server.toml and the admin token were kept"
echo "depends: $(dpkg-query -W -f='${Depends}' call-proxy-server) / $(dpkg-query -W -f='${Depends}' tv-agent)"

step "systemd-analyze verify and security on the installed units"
# verify exits 0 even on an unknown key or a bad value (it only warns), so any output
# at all is a failure. First show the check catches a broken unit.
sed 's/^ProtectSystem=strict/ProtectSytem=strict/' $units/call-proxy-server.service \
  >"$work/broken.service"
[ -n "$(systemd-analyze verify "$work/broken.service" 2>&1)" ] ||
  fail "systemd-analyze verify did not notice a misspelt key"
for u in call-proxy-server tv-agent; do
  out=$(systemd-analyze verify "$units/$u.service" 2>&1) || { echo "$out"; fail "verify $u.service"; }
  [ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify $u.service complained"; }
  echo "$u.service: verify clean"
done
# Exposure (0 best, 10 worst; --threshold counts tenths); the agent keeps the sound
# card and ALSA's /proc/asound, so it is allowed more.
for u in call-proxy-server:15 tv-agent:25; do
  out=$(systemd-analyze security --offline=yes --threshold="${u#*:}" "$units/${u%%:*}.service" 2>&1) ||
    { echo "$out" | grep -v '^✓' | tail -25; fail "${u%%:*}.service exposure above ${u#*:}/10"; }
  echo "${u%%:*}.service: $(echo "$out" | grep -o 'Overall exposure level.*' | sed 's/\x1b\[[0-9;]*m//g')"
done

# ---------------------------------------------------------------- the unit emulation
# The value of KEY in unit file FILE (the last one set).
unit_key() { sed -n "s/^$2=//p" "$1" | tail -1; }

# A free uid in systemd's DynamicUser range.
pick_uid() {
  local u
  for u in $(seq "$1" 65519); do
    getent passwd "$u" >/dev/null || getent group "$u" >/dev/null && continue
    [ -z "$(ps -o pid= -u "$u" 2>/dev/null)" ] && { echo "$u"; return 0; }
  done
  return 1
}

# Starts unit $1 in the background as systemd would (see the header), as uid $2, stdout
# to $1.out and stderr to $1.log in the work directory, its system calls (strace -f)
# appended to $1.strace; sets $unit_pid (to wait for) and $main_pid (the service's
# process, the tracee: what systemd would signal).
run_unit() {
  local unit=$1 uid=$2 file=$units/$1.service
  local state exec nofile cred mode envfile groups
  state=$(unit_key "$file" StateDirectory)
  mode=$(unit_key "$file" StateDirectoryMode)
  exec=$(unit_key "$file" ExecStart)
  nofile=$(unit_key "$file" LimitNOFILE)
  cred=$(unit_key "$file" LoadCredential)
  envfile=$(unit_key "$file" EnvironmentFile)
  groups=$(unit_key "$file" SupplementaryGroups)
  # A container without CAP_SYS_RESOURCE cannot go above its own hard limit.
  local hard
  hard=$(ulimit -Hn)
  if [ -n "$nofile" ] && [ "$hard" != unlimited ] && [ "$nofile" -gt "$hard" ]; then
    echo "LimitNOFILE=$nofile: this machine allows at most $hard, the test uses that"
    nofile=$hard
  fi
  [ "$(unit_key "$file" DynamicUser)" = yes ] && [ "$(unit_key "$file" ProtectSystem)" = strict ] ||
    fail "$unit.service: expected DynamicUser=yes and ProtectSystem=strict"
  # The environment: Environment= lines, then EnvironmentFile= (KEY=VALUE lines).
  declare -A env=()
  local kv words w line
  while read -r line; do
    read -ra words <<<"$line"
    for kv in "${words[@]}"; do env[${kv%%=*}]=${kv#*=}; done
  done < <(sed -n 's/^Environment=//p' "$file")
  if [ -n "$envfile" ]; then
    while IFS= read -r line; do
      [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] && env[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
    done <"$envfile"
  fi
  env[STATE_DIRECTORY]=/var/lib/$state
  # ExecStart's words: ${VAR} is one argument, $VAR is split on spaces (systemd's rules).
  local argv=() more=()
  read -ra words <<<"$exec"
  for w in "${words[@]}"; do
    if [[ $w =~ ^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$ ]]; then
      argv+=("${env[${BASH_REMATCH[1]}]-}")
    elif [[ $w =~ ^\$([A-Za-z_][A-Za-z0-9_]*)$ ]]; then
      read -ra more <<<"${env[${BASH_REMATCH[1]}]-}"
      argv+=("${more[@]}")
    elif [[ $w == *'$'* ]]; then
      fail "$unit.service: cannot expand $w"
    else
      argv+=("$w")
    fi
  done
  # StateDirectory= with DynamicUser=: /var/lib/private/NAME owned by the service's
  # user, /var/lib/NAME a link to it.
  install -d -m 0700 /var/lib/private
  install -d -m "${mode:-0755}" -o "$uid" -g "$uid" "/var/lib/private/$state"
  chown -R "$uid:$uid" "/var/lib/private/$state"
  ln -sfn "private/$state" "/var/lib/$state"
  install -d -m 0755 /run/credentials
  local cred_name="" cred_src=""
  if [ -n "$cred" ]; then
    cred_name=${cred%%:*} cred_src=${cred#*:}
    env[CREDENTIALS_DIRECTORY]=/run/credentials/$unit.service
  fi
  local envv=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
  for kv in "${!env[@]}"; do envv+=("$kv=${env[$kv]}"); done
  local setpriv_groups=(--clear-groups)
  [ -n "$groups" ] && getent group "$groups" >/dev/null && setpriv_groups=(--groups "$groups")
  env -i "${envv[@]}" unshare --mount --propagation private -- bash -c '
    set -e
    unit=$1 uid=$2 state=$3 nofile=$4 cred_name=$5 cred_src=$6; shift 6
    # PrivateTmp= and ProtectHome=.
    mount -t tmpfs -o mode=1777,size=64m tmpfs /tmp
    mount -t tmpfs -o mode=1777,size=64m tmpfs /var/tmp
    for d in /home /root; do mount -t tmpfs -o ro,mode=0755,size=1m tmpfs "$d"; done
    # DynamicUser=: /var/lib/private is root-only; the service sees its own directory there.
    mkdir /tmp/.state
    mount --bind "/var/lib/private/$state" /tmp/.state
    mount -t tmpfs -o mode=0755,size=1m tmpfs /var/lib/private
    mkdir "/var/lib/private/$state"
    mount --move /tmp/.state "/var/lib/private/$state"
    rmdir /tmp/.state
    # LoadCredential=: a copy readable by the service user only.
    mount -t tmpfs -o mode=0755,size=1m tmpfs /run/credentials
    if [ -n "$cred_name" ]; then
      mkdir -m 0500 "/run/credentials/$unit.service"
      install -m 0400 -o "$uid" "$cred_src" "/run/credentials/$unit.service/$cred_name"
      chown "$uid" "/run/credentials/$unit.service"
      mount -o remount,ro /run/credentials
    fi
    # ProtectSystem=strict: everything read-only but the mounts above.
    mount -o remount,bind,ro /
    umask 0077
    exec prlimit --nofile="$nofile:$nofile" setpriv --reuid="$uid" --regid="$uid" \
      '"${setpriv_groups[*]}"' --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@"
  ' _ "$unit" "$uid" "$state" "${nofile:-1024}" "$cred_name" "$cred_src" \
    strace -f -qq -o '|cat >&3' "${argv[@]}" \
    >"$work/$unit.out" 2>"$work/$unit.log" 3>>"$work/$unit.strace" &
  unit_pid=$!
  pids+=("$unit_pid")
  main_pid=""
  local c
  for _ in $(seq 100); do
    for c in $(ps -o pid= --ppid "$unit_pid"); do
      [ "$(readlink "/proc/$c/exe" 2>/dev/null)" = "${argv[0]}" ] && main_pid=$c
    done
    [ -n "$main_pid" ] && break
    sleep 0.05
  done
  [ -n "$main_pid" ] || fail "$unit did not start ${argv[0]}"
  # The tracee outlives a killed strace: the cleanup must stop it too.
  pids+=("$main_pid")
}

# Checks the system calls and socket families unit $1 used (its .strace) against its
# SystemCallFilter= and RestrictAddressFamilies=, which only a real systemd enforces.
audit_syscalls() {
  local unit=$1
  python3 - "$units/$unit.service" "$work/$unit.strace" "$(systemd-analyze syscall-filter 2>/dev/null)" <<'PY'
import re, sys
unit, trace, groups_text = sys.argv[1:]
groups, cur = {}, None
for line in groups_text.splitlines():
    if line.startswith("@"):
        cur = groups.setdefault(line.strip(), set())
    elif cur is not None and line.strip() and not line.strip().startswith("#"):
        cur.add(line.strip())
def expand(name, seen=()):
    if not name.startswith("@"):
        return {name}
    out = set()
    for m in groups[name]:
        if m not in seen:
            out |= expand(m, seen + (name,))
    return out
allowed, families = None, None
for line in open(unit):
    key, _, value = line.strip().partition("=")
    if key == "SystemCallFilter":
        deny = value.startswith("~")
        names = set().union(*(expand(n) for n in value.lstrip("~").split()))
        if deny:
            allowed = (allowed or set()) - names
        else:
            allowed = (allowed or set()) | names
    elif key == "RestrictAddressFamilies":
        families = set(value.split())
used, socks = {}, set()
for line in open(trace):
    m = re.match(r"^\d+ +([a-z0-9_]+)\((.*)", line)
    if not m:
        continue
    used[m.group(1)] = used.get(m.group(1), 0) + 1
    if m.group(1) == "socket":
        socks.add(m.group(2).split(",")[0])
bad = sorted(n for n in used if n not in allowed)
badfam = sorted(socks - families)
print(f"{len(used)} distinct system calls ({sum(used.values())} calls), socket families {sorted(socks)}")
if bad or badfam:
    print(f"outside SystemCallFilter: {bad}; outside RestrictAddressFamilies: {badfam}")
    sys.exit(1)
PY
}

# Sends SIGTERM to the service process $3 of unit $1 (started as $2) and waits up to
# the unit's TimeoutStopSec; fails if it does not exit in time or exits non-zero (strace
# exits with its tracee's status); prints how long it took.
stop_unit() {
  local unit=$1 pid=$2 main=$3 limit t0 rc=0
  limit=$(unit_key "$units/$unit.service" TimeoutStopSec)
  limit=${limit%s}
  t0=$(date +%s%N)
  kill -TERM "$main"
  for _ in $(seq $((limit * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && fail "$unit did not exit within TimeoutStopSec=${limit}s of SIGTERM"
  wait "$pid" || rc=$?
  local keep=() p
  for p in "${pids[@]}"; do [ "$p" = "$pid" ] || [ "$p" = "$main" ] || keep+=("$p"); done
  pids=("${keep[@]}")
  [ "$rc" = 0 ] || fail "$unit exited $rc after SIGTERM"
  echo "$unit: SIGTERM -> exit 0 in $(( ($(date +%s%N) - t0) / 1000000 )) ms (TimeoutStopSec=${limit}s)"
}

# Checks that process $2 (unit $1) runs as the unit says: uid $3, no capabilities,
# no new privileges, the unit's open-file limit (or the machine's), a read-only root.
check_sandbox() {
  local unit=$1 pid=$2 uid=$3 st want hard
  st=/proc/$pid/status
  [ "$(awk '/^Uid:/ {print $2 $3 $4 $5}' "$st")" = "$uid$uid$uid$uid" ] || fail "$unit does not run as uid $uid"
  [ "$(awk '/^CapBnd:/ {print $2}' "$st")" = 0000000000000000 ] || fail "$unit has capabilities"
  [ "$(awk '/^NoNewPrivs:/ {print $2}' "$st")" = 1 ] || fail "$unit may gain privileges"
  want=$(unit_key "$units/$unit.service" LimitNOFILE)
  want=${want:-1024}
  hard=$(ulimit -Hn)
  [ "$hard" != unlimited ] && [ "$want" -gt "$hard" ] && want=$hard
  [ "$(awk '/^Max open files/ {print $4}' "/proc/$pid/limits")" = "$want" ] ||
    fail "$unit's open-file limit is not $want"
  awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | grep -q '^ro' || fail "$unit's root is writable"
  echo "$unit (pid $pid): uid $uid, no capabilities, no new privileges, $want descriptors, read-only /"
}

token=$(cat /etc/tvcall/admin.token)
api() { CALL_PROXY_ADMIN_TOKEN=$token /usr/bin/call-proxy-server "$@"; }
# Prints the JSON array from stdin filtered by a Python expression on each row `r`.
rows() { python3 -c 'import json, sys; print(json.dumps([r for r in json.load(sys.stdin) if eval(sys.argv[1])]))' "$1"; }
count() { python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'; }
# Waits up to $1 seconds until the command in $2... prints a positive number.
wait_until() {
  local secs=$1 v
  shift
  for _ in $(seq $((secs * 10))); do
    v=$("$@" 2>/dev/null) || v=0
    [[ $v =~ ^[1-9][0-9]*$ ]] && return 0
    sleep 0.1
  done
  return 1
}
online() { api users --admin "$admin" --online --format json | rows "r['user_id'] == $1" | count; }
offline() { api users --admin "$admin" --format json | rows "r['user_id'] == $1 and r['user_netstate'] == 0" | count; }

# ---------------------------------------------------------------- the server
server_uid=$(pick_uid 61184) || fail "no free uid"
step "call-proxy-server as its unit runs it (uid $server_uid): $(unit_key $units/call-proxy-server.service ExecStart)"
run_unit call-proxy-server "$server_uid"
server_pid=$unit_pid server_main=$main_pid
wait_for_port $server_port || fail "the server does not listen on $server_port"
wait_for_port $admin_port || fail "the admin API does not listen on $admin_port"
check_sandbox call-proxy-server "$server_main" "$server_uid"
grep -o 'connection limits.*' "$work/call-proxy-server.log" | head -1 || true
[ "$(python3 -c 'import urllib.request; print(urllib.request.urlopen("'"$admin"'/readyz", timeout=5).status)')" = 200 ] ||
  fail "/readyz is not 200"
ca=/var/lib/tvcall/tls/ca.crt
db=/var/lib/tvcall/call-proxy.sqlite
[ -s "$ca" ] && [ -s "$db" ] || fail "no $ca or $db"
echo "readyz 200; database $db and the TVs' CA $ca (in /var/lib/private/tvcall, uid $server_uid)"

step "TV 1001 (a scripted tv-agent) is enrolled; the operator approves with the packaged CLI on the packaged database"
server=127.0.0.1:$server_port
enroll_agent=(timeout 60 /usr/bin/tv-agent) server_bin=/usr/bin/call-proxy-server
enroll_tv 1001 "$ca" "$work/tv-1001"
grep -q '"enrolled":1001' "$work/tv-1001.enroll.json" || fail "TV 1001 was not enrolled"

step "TV 2002: the packaged agent as its unit runs it, configured in /etc/default/tv-agent"
install -d -m 0755 /etc/tv-agent
install -m 0644 "$ca" /etc/tv-agent/ca.crt
sed -i -e "s/^SERVER=.*/SERVER=$server/" -e 's/^AUDIO_IN=.*/AUDIO_IN=null/' \
  -e 's/^AUDIO_OUT=.*/AUDIO_OUT=null/' /etc/default/tv-agent
agent_uid=$(pick_uid $((server_uid + 1))) || fail "no free uid"
run_unit tv-agent "$agent_uid"
agent_pid=$unit_pid
for _ in $(seq 50); do [ -s "$work/tv-agent.out" ] || [ -s "$work/tv-agent.log" ] && break; sleep 0.1; done
check_sandbox tv-agent "$main_pid" "$agent_uid"
for _ in $(seq 150); do [ -s "$work/tv-agent.out" ] && break; sleep 0.1; done
code=$(head -1 "$work/tv-agent.out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["user_code"])') ||
  fail "the agent showed no activation code"
echo "TV 2002 shows code $code; the operator approves it through the admin API"
python3 - "$admin" "$code" "$token" <<'EOF' || fail "approval through the admin API"
import json, sys, urllib.request
admin, code, token = sys.argv[1:]
req = urllib.request.Request(f"{admin}/api/enrollments/{code}", method="POST",
    data=json.dumps({"user": 2002}).encode(),
    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=5).read().decode())
EOF
wait_until 20 online 2002 || fail "TV 2002 is not online"
echo "TV 2002 online: $(api users --admin "$admin" --online --format json | rows "r['user_id'] == 2002")"
[ "$(python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:'$ui_port'/", timeout=5).status)')" = 200 ] ||
  fail "the TV's UI does not answer on $ui_port"
echo "its on-screen UI answers on http://127.0.0.1:$ui_port/"

step "TV 2002 is switched off (SIGTERM)"
stop_unit tv-agent "$agent_pid" "$main_pid"
wait_until 10 offline 2002 || fail "TV 2002 is still online"

step "TV 1001 calls 2002, which is off: the call is cached"
out=$(timeout 60 /usr/bin/tv-agent call --server "$server" --data-dir "$work/tv-1001" --to 2002 \
  --audio-in tone:440 --audio-out null) || fail "tv-agent call: $out"
echo "$out"
echo "$out" | grep -q '"outcome":"cached"' || fail "the call was not cached"
[ "$(api calls --admin "$admin" --outcome cached-undelivered --format json | rows "r['user_id'] == 1001 and r['otheruser_id'] == 2002" | count)" = 1 ] ||
  fail "the server does not hold the cached call"

step "TV 2002 is switched on: the cached call is delivered"
run_unit tv-agent "$agent_uid"
agent_pid=$unit_pid
delivered() { api calls --admin "$admin" --outcome delivered --format json | rows "r['user_id'] == 1001 and r['otheruser_id'] == 2002" | count; }
wait_until 20 delivered || fail "the cached call was not delivered"
grep -Eq '"user_id": *1001' /var/lib/tv-agent/missed.json && grep -Eq '"otheruser_id": *2002' /var/lib/tv-agent/missed.json ||
  fail "the TV's missed-call list (/var/lib/tv-agent/missed.json) lacks the call from 1001"
echo "TV 2002 keeps it in /var/lib/tv-agent/missed.json: $(tr -d ' \n' </var/lib/tv-agent/missed.json | head -c 160)"
echo "delivered: $(api calls --admin "$admin" --outcome delivered --format json | head -c 400)"
stop_unit tv-agent "$agent_pid" "$main_pid"

step "Stopping the server the way systemctl stop does (SIGTERM)"
stop_unit call-proxy-server "$server_pid" "$server_main"
grep -q 'stopped' "$work/call-proxy-server.log" || fail "the server did not log its clean stop"
others=$(find /var/lib/private/tvcall /var/lib/private/tv-agent ! -uid "$server_uid" ! -uid "$agent_uid" | head -5)
[ -z "$others" ] || fail "state files not owned by the service users (operator CLI as root?): $others"
echo "every state file belongs to its service's user"
for u in call-proxy-server tv-agent; do
  out=$(audit_syscalls "$u") || { echo "$out"; fail "$u used what its unit forbids"; }
  echo "$u: $out, all allowed by its unit"
done

# ---------------------------------------------------------------- purge
step "dpkg --purge: nothing may be left"
dpkg --purge "${pkgs[@]}" >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; fail "dpkg --purge"; }
left=()
for f in /usr/bin/call-proxy-server /usr/bin/tv-agent /etc/tvcall /etc/default/tv-agent /etc/tv-agent \
  /var/lib/tvcall /var/lib/private/tvcall /var/lib/tv-agent /var/lib/private/tv-agent \
  $units/call-proxy-server.service $units/tv-agent.service \
  /etc/systemd/system/multi-user.target.wants/call-proxy-server.service \
  /etc/systemd/system/multi-user.target.wants/tv-agent.service /usr/share/doc/call-proxy-server \
  /usr/share/doc/tv-agent; do
  [ -e "$f" ] || [ -L "$f" ] && left+=("$f")
done
# deb-systemd-helper's enablement state and links, wherever they are.
while IFS= read -r f; do left+=("$f"); done < <(find /etc/systemd /var/lib/systemd \
  \( -name '*call-proxy-server*' -o -name '*tv-agent*' \) 2>/dev/null)
[ ${#left[@]} = 0 ] || fail "left behind after purge: ${left[*]}"
echo "nothing left"
ok=1
echo
echo "package-test: passed in $(($(date +%s) - started)) s"
