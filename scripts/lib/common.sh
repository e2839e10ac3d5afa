# shellcheck shell=bash
# shellcheck disable=SC2034  # the settings are used by the scripts that source this file
# Shared settings and helpers for the network-namespace fault tooling (sourced, not run).
#
# Everything is configurable through the environment; the defaults give this topology:
#
#   ts-client 10.77.0.2 ─┐
#   ts-proxy  10.77.0.10 ─┤  bridge "br0" inside the switch namespace ts-sw
#   ts-a      10.77.0.11 ─┤  (nothing is created in the root namespace)
#   ts-b      10.77.0.12 ─┘
#
#   TS_STATE_DIR   state directory (certificates, logs, pids, data)     /tmp/ts-netns
#   TS_NET_PREFIX  first three octets of the /24 used                   10.77.0
#   TS_NS_PREFIX   prefix of the namespace names                        ts-
#   TUPLESPACE_BIN the tuplespace binary                                <repo>/target/release/tuplespace
#   TS_CONFIG      configuration file given to every process            <repo>/config/tuplespace.toml
#   TS_SET         extra `--set` overrides for proxy and servers, space separated (KEY=VALUE ...)
#
# netns-up.sh writes the values it used to $TS_STATE_DIR/env; the other scripts read it back for
# every variable the environment leaves unset, so a later fault.sh from another shell sees the
# same topology.

TS_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TS_REPO_DIR=$(cd "$TS_SCRIPTS_DIR/.." && pwd)

TS_STATE_DIR=${TS_STATE_DIR:-/tmp/ts-netns}
if [[ -r "$TS_STATE_DIR/env" && -z "${TS_IGNORE_STATE_ENV:-}" ]]; then
  # shellcheck disable=SC1091
  source "$TS_STATE_DIR/env"
fi
TS_NET_PREFIX=${TS_NET_PREFIX:-10.77.0}
TS_NS_PREFIX=${TS_NS_PREFIX:-ts-}
TUPLESPACE_BIN=${TUPLESPACE_BIN:-$TS_REPO_DIR/target/release/tuplespace}
TS_CONFIG=${TS_CONFIG:-$TS_REPO_DIR/config/tuplespace.toml}
TS_SET=${TS_SET:-}

# Hosts: short name -> namespace, address.
TS_HOSTS=(client proxy a b)
TS_NS_SWITCH="${TS_NS_PREFIX}sw"
TS_BRIDGE=br0
declare -A TS_IP=(
  [client]="$TS_NET_PREFIX.2"
  [proxy]="$TS_NET_PREFIX.10"
  [a]="$TS_NET_PREFIX.11"
  [b]="$TS_NET_PREFIX.12"
)

# Ports (fixed, as in the README's multi-host example).
TS_PORT_CLIENT=7400
TS_PORT_SERVER=7401
TS_PORT_ADMIN=7402
TS_PORT_SHUTDOWN=7410
TS_PORT_BACKUP=7411
TS_PORT_HEARTBEAT=7412
TS_PORT_RELAY=7500

TS_PROXY_SAP="${TS_IP[proxy]}:$TS_PORT_CLIENT"
TS_ADMIN_SAP="${TS_IP[proxy]}:$TS_PORT_ADMIN"
TS_RELAY_SAP="${TS_IP[proxy]}:$TS_PORT_RELAY"
TS_CLIENT_CERTS="$TS_STATE_DIR/certs/client"

# iptables chain holding every fault rule, in each host namespace (hooked from INPUT).
TS_CHAIN=TSFAULT

ts_ns() { echo "${TS_NS_PREFIX}$1"; }

ts_log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
ts_die() {
  echo "error: $*" >&2
  exit 1
}

ts_is_host() {
  local h
  for h in "${TS_HOSTS[@]}"; do [[ "$1" == "$h" ]] && return 0; done
  return 1
}

ts_need_root() {
  [[ $(id -u) -eq 0 ]] || ts_die "must run as root (network namespaces, iptables)"
  command -v ip >/dev/null 2>&1 || ts_die "the \`ip\` command (iproute2) is missing: apt-get install -y iproute2"
}

# ts_ensure_cmd CMD PACKAGE: installs PACKAGE with apt-get when CMD is missing, or fails clearly.
ts_ensure_cmd() {
  local cmd=$1 pkg=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    ts_die "\`$cmd\` is missing and apt-get is not available: install the $pkg package"
  fi
  ts_log "\`$cmd\` is missing: installing $pkg with apt-get"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 ||
      ts_die "\`$cmd\` is missing and \`apt-get install -y $pkg\` failed: install it by hand"
  fi
  command -v "$cmd" >/dev/null 2>&1 || ts_die "installed $pkg but \`$cmd\` is still not found"
}

ts_ensure_iptables() { ts_ensure_cmd iptables iptables; }

ts_ensure_python() { ts_ensure_cmd python3 python3; }

ts_check_bin() {
  [[ -x "$TUPLESPACE_BIN" ]] ||
    ts_die "tuplespace binary not found at $TUPLESPACE_BIN: run \`cargo build --release\` in $TS_REPO_DIR or set TUPLESPACE_BIN"
}

ts_ns_exists() { [[ -e "/run/netns/$1" ]] || ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

ts_topology_up() { ts_ns_exists "$(ts_ns proxy)" && [[ -r "$TS_STATE_DIR/env" ]]; }

# ts_status_json: the proxy's STATUS as one JSON line (exit 1 when it cannot be had in 5 s).
ts_status_json() {
  ip netns exec "$(ts_ns client)" timeout -k 1 5 "$TUPLESPACE_BIN" --certs "$TS_CLIENT_CERTS" \
    --config "$TS_CONFIG" client --sap "$TS_PROXY_SAP" --admin-sap "$TS_ADMIN_SAP" --json status \
    2>/dev/null | grep -m1 '"cluster"'
}

# ts_json_get EXPR < json: prints a field of the JSON on stdin, e.g. cluster.primary.pid
# (empty output for null/missing).
ts_json_get() {
  python3 -c '
import json, sys
try:
    v = json.loads(sys.stdin.read())
except Exception:
    sys.exit(1)
for part in sys.argv[1].split("."):
    if isinstance(v, dict) and part in v:
        v = v[part]
    else:
        v = None
        break
if v is None:
    sys.exit(0)
print(json.dumps(v) if isinstance(v, (dict, list)) else str(v).lower() if isinstance(v, bool) else v)
' "$1"
}

# ts_status_summary JSON: "epoch=N primary=PID@SAP backup=PID@SAP|none synced=BOOL"
ts_status_summary() {
  python3 -c '
import json, sys
try:
    s = json.loads(sys.argv[1])
except Exception:
    print("status: unreadable"); sys.exit(0)
c = s.get("cluster") or {}
def node(n):
    return "none" if not n else "%s@%s" % (n.get("pid"), n.get("sap"))
print("epoch=%s primary=%s backup=%s synced=%s" % (c.get("epoch"), node(c.get("primary")),
      node(c.get("backup")), str(c.get("backup_synced")).lower()))
' "$1"
}

# ts_ns_of_pid PID: the namespace (ts-...) a process is in, by comparing /proc/PID/ns/net.
ts_ns_of_pid() {
  local pid=$1 ino n
  ino=$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) || return 1
  for n in "${TS_HOSTS[@]}"; do
    if [[ -e "/run/netns/$(ts_ns "$n")" ]] && [[ $(stat -L -c %i "/run/netns/$(ts_ns "$n")") == "$ino" ]]; then
      echo "$n"
      return 0
    fi
  done
  return 1
}

# ts_host_of_ip IP: the short host name owning an address.
ts_host_of_ip() {
  local h
  for h in "${TS_HOSTS[@]}"; do [[ "${TS_IP[$h]}" == "$1" ]] && echo "$h" && return 0; done
  return 1
}

# ts_tuplespace_pids HOST: pids of tuplespace processes in a host's namespace.
ts_tuplespace_pids() {
  local ns p exe
  ns=$(ts_ns "$1")
  ts_ns_exists "$ns" || return 0
  for p in $(ip netns pids "$ns" 2>/dev/null); do
    exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
    [[ "$exe" == "$(readlink -f "$TUPLESPACE_BIN")" || "$(basename "$exe")" == tuplespace* ]] && echo "$p"
  done
  return 0
}

# ts_config_accepts KEY=VALUE: succeeds if TUPLESPACE_BIN's configuration accepts this override
# (a key newer than the binary is refused as unknown); otherwise prints why and fails. Uses a
# `config-check` subcommand if the binary has one; else compares what `proxy` says about three
# unusable SAPs with and without the override (it fails on the configuration first, or on the
# SAPs, before it starts anything).
ts_config_accepts() {
  local kv=$1 key=${1%%=*} with without
  if "$TUPLESPACE_BIN" config-check --help >/dev/null 2>&1; then
    with=$(RUST_LOG=off "$TUPLESPACE_BIN" --config "$TS_CONFIG" --set "$kv" config-check 2>&1 </dev/null) &&
      return 0
    echo "$with" | tr '\n' ' ' | cut -c1-200
    return 1
  fi
  without=$(RUST_LOG=off "$TUPLESPACE_BIN" --config "$TS_CONFIG" proxy - - - 2>&1 </dev/null) || true
  with=$(RUST_LOG=off "$TUPLESPACE_BIN" --config "$TS_CONFIG" --set "$kv" proxy - - - 2>&1 </dev/null) || true
  [[ "$with" == "$without" || "$with" != *"$key"* ]] && return 0
  if [[ "$with" == *"unknown field"* ]]; then
    echo "unknown configuration key \`$key\`"
  else
    echo "$with" | tr '\n' ' ' | cut -c1-160
  fi
  return 1
}
