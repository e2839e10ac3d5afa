#!/usr/bin/env bash
# Brings up tuplespace on four "hosts" (network namespaces) joined by a bridge: client, proxy,
# server A (primary) and server B (backup). See docs/FAULTS.md.
set -Eeuo pipefail

usage() {
  cat <<'EOF'
usage: netns-up.sh [--force] [--no-relay] [--timeout SECS] [--set KEY=VALUE]...

Creates the namespaces, links, per-host certificates, starts the proxy (in ts-proxy), the primary
(in ts-a) which launches its backup in ts-b, and the UDP relay (in ts-proxy, 10.77.0.10:7500 ->
:7400, no faults until fault.sh sets some); waits until STATUS shows a primary and a synchronised
backup on the other host.

  --force          tear down an existing topology first (netns-down.sh) instead of refusing
  --no-relay       do not start the UDP relay
  --timeout SECS   longest wait for primary + synchronised backup (default 30)
  --set KEY=VALUE  configuration override for proxy and servers (repeatable; also $TS_SET)

Environment: TS_STATE_DIR (/tmp/ts-netns), TS_NET_PREFIX (10.77.0), TS_NS_PREFIX (ts-),
TUPLESPACE_BIN (<repo>/target/release/tuplespace), TS_CONFIG (<repo>/config/tuplespace.toml),
TS_SET (space-separated KEY=VALUE overrides), RUST_LOG (info), TS_NO_BIN_COPY (set: run
TUPLESPACE_BIN in place instead of a copy in the state directory), TS_LAUNCH_MODE (exec: the pid
the primary tracks for its backup is the backup itself, as for a local child; detach: the
backup runs under a launcher, a SIGKILL of the tracked pid leaves it running; see
ns-exec-by-ip.sh --help), TS_PROXY_STATE (auto: give the proxy
`--set proxy_state_file=$TS_STATE_DIR/data/proxy/proxy.state` if the binary's configuration
accepts that key, which older builds refuse; on: always; off: never).

Layout of the state directory:
  env                 the settings used (read back by fault.sh, netns-down.sh)
  bin/tuplespace      the copy of TUPLESPACE_BIN every process runs
  ca/                 the cluster CA (ca.key stays here)
  certs/{proxy,a,b}/  node certificate with that host's IP as SAN, and ca.pem
  certs/client/       client and admin certificates (for ts-client)
  logs/               proxy.log, server-a.log, server-b.log (every server that ran on that host), relay.log
  pids/               proxy.pid, primary.pid, relay.pid, launched (every backup started)
  proxy.cmd           the proxy's command line (NUL-separated; run in ts-proxy from the state
                      directory), so that `fault.sh proxy-restart` starts it again exactly so
  data/space.json     SAVE_FILE of the servers
  data/proxy/         the proxy host's data directory (proxy.state, see TS_PROXY_STATE)
EOF
}

force=0
relay=1
timeout_s=30
extra_set=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --force) force=1; shift ;;
    --no-relay) relay=0; shift ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --set) extra_set+=("$2"); shift 2 ;;
    *) echo "netns-up.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

# netns-up.sh defines the topology: it reads the environment, not a previous run's env file.
export TS_IGNORE_STATE_ENV=1
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
TS_LAUNCH_MODE=${TS_LAUNCH_MODE:-exec}
[[ "$TS_LAUNCH_MODE" == exec || "$TS_LAUNCH_MODE" == detach ]] || ts_die "TS_LAUNCH_MODE must be exec or detach"
TS_PROXY_STATE=${TS_PROXY_STATE:-auto}
case "$TS_PROXY_STATE" in
  auto | on | off) ;;
  1 | yes | true) TS_PROXY_STATE=on ;;
  0 | no | false) TS_PROXY_STATE=off ;;
  *) ts_die "TS_PROXY_STATE must be auto, on or off (got \`$TS_PROXY_STATE\`)" ;;
esac

ts_need_root
ts_check_bin
ts_ensure_python
ts_ensure_iptables
[[ -r "$TS_CONFIG" ]] || ts_die "configuration file $TS_CONFIG not found (set TS_CONFIG)"
TUPLESPACE_BIN=$(readlink -f "$TUPLESPACE_BIN")
TS_CONFIG=$(readlink -f "$TS_CONFIG")

existing=()
for h in "${TS_HOSTS[@]}" sw; do
  ts_ns_exists "$(ts_ns "$h")" && existing+=("$(ts_ns "$h")")
done
if [[ ${#existing[@]} -gt 0 ]]; then
  if [[ $force == 1 ]]; then
    "$TS_SCRIPTS_DIR/netns-down.sh"
  else
    ts_die "namespaces already exist (${existing[*]}): run scripts/netns-down.sh first, or netns-up.sh --force"
  fi
fi

# ---- cleanup on failure -------------------------------------------------------------------
on_fail() {
  local rc=$?
  trap - ERR INT TERM
  echo "netns-up.sh: failed (exit $rc); last log lines:" >&2
  for f in "$TS_STATE_DIR"/logs/*.log; do
    [[ -s "$f" ]] || continue
    echo "--- $f" >&2
    tail -n 15 "$f" >&2
  done
  echo "netns-up.sh: tearing down (logs kept in $TS_STATE_DIR/logs)" >&2
  "$TS_SCRIPTS_DIR/netns-down.sh" >&2 || true
  exit 1
}
trap on_fail ERR
trap 'echo "netns-up.sh: interrupted" >&2; (exit 130); on_fail' INT TERM

# ---- state directory ------------------------------------------------------------------------
rm -rf "${TS_STATE_DIR:?}"/{ca,certs,pids,data,relay,env,env.last,proxy.cmd}
mkdir -p "$TS_STATE_DIR"/{ca,certs,logs,pids,data,data/proxy,relay,bin}
# Every process (and every backup launched later) runs one copy of the binary: a rebuild of
# target/release while the topology is up must not mix two builds in one cluster.
if [[ -z "${TS_NO_BIN_COPY:-}" && "$TUPLESPACE_BIN" != "$TS_STATE_DIR/bin/tuplespace" ]]; then
  cp -f "$TUPLESPACE_BIN" "$TS_STATE_DIR/bin/tuplespace.tmp"
  mv -f "$TS_STATE_DIR/bin/tuplespace.tmp" "$TS_STATE_DIR/bin/tuplespace"
  TUPLESPACE_BIN="$TS_STATE_DIR/bin/tuplespace"
  "$TUPLESPACE_BIN" --version >/dev/null
fi
# Old logs are kept under logs/previous/ (one level only).
if compgen -G "$TS_STATE_DIR/logs/*.log" >/dev/null; then
  rm -rf "$TS_STATE_DIR/logs/previous"
  mkdir -p "$TS_STATE_DIR/logs/previous"
  mv "$TS_STATE_DIR"/logs/*.log "$TS_STATE_DIR/logs/previous/"
fi

set_flags=()
for s in $TS_SET "${extra_set[@]}"; do set_flags+=(--set "$s"); done

# The proxy's durable state file (the configuration key `proxy_state_file`, which builds from
# before it existed refuse as an unknown key). auto: pass it if this binary accepts it.
proxy_state_file="$TS_STATE_DIR/data/proxy/proxy.state"
proxy_state_flags=()
proxy_state_note=""
if [[ " $TS_SET ${extra_set[*]} " == *" proxy_state_file="* ]]; then
  proxy_state_note="proxy_state_file given in TS_SET/--set"
elif [[ "$TS_PROXY_STATE" == on ]]; then
  proxy_state_flags=(--set "proxy_state_file=$proxy_state_file")
elif [[ "$TS_PROXY_STATE" == auto ]]; then
  if probe=$(ts_config_accepts "proxy_state_file=$proxy_state_file"); then
    proxy_state_flags=(--set "proxy_state_file=$proxy_state_file")
  else
    proxy_state_note="not passed: this tuplespace does not accept proxy_state_file ($probe)"
    ts_log "proxy_state_file $proxy_state_note"
  fi
fi
[[ ${#proxy_state_flags[@]} -gt 0 ]] && proxy_state_note="$proxy_state_file"

{
  echo "# written by netns-up.sh $(date '+%F %T'); fills variables the environment leaves unset"
  for v in TS_NET_PREFIX TS_NS_PREFIX TUPLESPACE_BIN TS_CONFIG TS_LAUNCH_MODE; do
    # shellcheck disable=SC2016  # literal ${...}: expanded when the file is sourced
    printf '[[ -n "${%s:-}" ]] || %s=%q\n' "$v" "$v" "${!v}"
  done
  printf 'TS_SET_USED=%q\n' "$TS_SET ${extra_set[*]}"
  printf 'TS_PROXY_STATE_USED=%q\n' "${proxy_state_note:-off}"
} >"$TS_STATE_DIR/env"

# ---- namespaces and links -------------------------------------------------------------------
sw=$TS_NS_SWITCH
ts_log "creating namespaces ${TS_NS_PREFIX}{${TS_HOSTS[*]// /,}} and switch $sw (bridge $TS_BRIDGE)"
ip netns add "$sw"
ip -n "$sw" link set lo up
ip -n "$sw" link add "$TS_BRIDGE" type bridge
ip -n "$sw" link set "$TS_BRIDGE" up
for h in "${TS_HOSTS[@]}"; do
  ns=$(ts_ns "$h")
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  # The veth pair is created inside the switch namespace and its peer moved straight into the
  # host: nothing touches the root namespace (its firewall, br_netfilter) at all.
  ip -n "$sw" link add "v-$h" type veth peer name eth0 netns "$ns"
  ip -n "$sw" link set "v-$h" master "$TS_BRIDGE"
  ip -n "$sw" link set "v-$h" up
  ip -n "$ns" addr add "${TS_IP[$h]}/24" dev eth0
  ip -n "$ns" link set eth0 up
  # The fault chain, empty: fault.sh adds DROP rules here.
  ip netns exec "$ns" iptables -N "$TS_CHAIN"
  ip netns exec "$ns" iptables -I INPUT 1 -j "$TS_CHAIN"
done

# ---- certificates ---------------------------------------------------------------------------
ts_log "issuing certificates into $TS_STATE_DIR/certs"
"$TUPLESPACE_BIN" certs --out "$TS_STATE_DIR/ca" >/dev/null
for h in proxy a b; do
  "$TUPLESPACE_BIN" --certs "$TS_STATE_DIR/ca" certs issue --role node --name "server-$h" \
    --san "${TS_IP[$h]}" --out "$TS_STATE_DIR/certs/$h" >/dev/null
done
"$TUPLESPACE_BIN" --certs "$TS_STATE_DIR/ca" certs issue --role client --name netns-client \
  --out "$TS_CLIENT_CERTS" >/dev/null
"$TUPLESPACE_BIN" --certs "$TS_STATE_DIR/ca" certs issue --role admin --name netns-admin \
  --out "$TS_CLIENT_CERTS" >/dev/null

# ---- processes ------------------------------------------------------------------------------
export RUST_LOG=${RUST_LOG:-info}
cd "$TS_STATE_DIR"

ts_log "starting the proxy in $(ts_ns proxy): clients $TS_PROXY_SAP, servers ${TS_IP[proxy]}:$TS_PORT_SERVER, admin $TS_ADMIN_SAP"
# The command line is recorded (NUL-separated) so that fault.sh proxy-restart can start the
# proxy again exactly so, from the same directory with the same RUST_LOG.
proxy_cmd=(env "RUST_LOG=$RUST_LOG" "$TUPLESPACE_BIN" --certs "$TS_STATE_DIR/certs/proxy"
  --config "$TS_CONFIG" "${set_flags[@]}" "${proxy_state_flags[@]}"
  proxy "$TS_PROXY_SAP" "${TS_IP[proxy]}:$TS_PORT_SERVER" "$TS_ADMIN_SAP")
printf '%s\0' "${proxy_cmd[@]}" >"$TS_STATE_DIR/proxy.cmd"
echo "=== $(date '+%F %T') proxy started by netns-up.sh: ${proxy_cmd[*]:2}" >>"$TS_STATE_DIR/logs/proxy.log"
ip netns exec "$(ts_ns proxy)" "${proxy_cmd[@]}" </dev/null >>"$TS_STATE_DIR/logs/proxy.log" 2>&1 &
echo $! >"$TS_STATE_DIR/pids/proxy.pid"
disown

# The primary launches every backup through this command; {backup_host} is the IP of its
# BACKUP_SAP, which after a promotion across hosts is the old primary's host. `exec` keeps the
# pid the primary tracks the backup's own (dash does not exec the last command of `sh -c`).
detach_flag=""
[[ "${TS_LAUNCH_MODE:-exec}" == detach ]] && detach_flag="--detach "
launch="exec '$TS_SCRIPTS_DIR/ns-exec-by-ip.sh' --state '$TS_STATE_DIR' $detach_flag{backup_host} '$TUPLESPACE_BIN' {args}"
ts_log "starting the primary in $(ts_ns a): shutdown ${TS_IP[a]}:$TS_PORT_SHUTDOWN, backup ${TS_IP[b]}:$TS_PORT_BACKUP, heartbeat ${TS_IP[a]}:$TS_PORT_HEARTBEAT"
{
  echo "=== $(date '+%F %T') primary started by netns-up.sh" >>"$TS_STATE_DIR/logs/server-a.log"
  ip netns exec "$(ts_ns a)" "$TUPLESPACE_BIN" --certs "$TS_STATE_DIR/certs/a" \
    --config "$TS_CONFIG" "${set_flags[@]}" --set "backup_launch_command=$launch" \
    server "${TS_IP[a]}:$TS_PORT_SHUTDOWN" "${TS_IP[proxy]}:$TS_PORT_SERVER" \
    "${TS_IP[b]}:$TS_PORT_BACKUP" "${TS_IP[a]}:$TS_PORT_HEARTBEAT" \
    "$TS_STATE_DIR/data/space.json" null null </dev/null >>"$TS_STATE_DIR/logs/server-a.log" 2>&1 &
  echo $! >"$TS_STATE_DIR/pids/primary.pid"
  disown
}
echo "$(cat "$TS_STATE_DIR/pids/primary.pid") a $(date +%s)" >>"$TS_STATE_DIR/pids/launched"

if [[ $relay == 1 ]]; then
  ts_log "starting the UDP relay in $(ts_ns proxy): $TS_RELAY_SAP -> $TS_PROXY_SAP (no faults)"
  echo '{}' >"$TS_STATE_DIR/relay/control.json"
  ip netns exec "$(ts_ns proxy)" python3 "$TS_SCRIPTS_DIR/udp_relay.py" \
    --listen "$TS_RELAY_SAP" --target "$TS_PROXY_SAP" --control "$TS_STATE_DIR/relay/control.json" \
    </dev/null >>"$TS_STATE_DIR/logs/relay.log" 2>&1 &
  echo $! >"$TS_STATE_DIR/pids/relay.pid"
  disown
fi

# ---- wait until primary + synchronised backup -----------------------------------------------
ts_log "waiting (at most ${timeout_s}s) for a primary and a synchronised backup"
deadline=$((SECONDS + timeout_s))
status=""
while :; do
  for p in proxy primary; do
    kill -0 "$(cat "$TS_STATE_DIR/pids/$p.pid")" 2>/dev/null ||
      { echo "netns-up.sh: the $p exited during start-up" >&2; false; }
  done
  if status=$(ts_status_json); then
    synced=$(ts_json_get cluster.backup_synced <<<"$status")
    bpid=$(ts_json_get cluster.backup.pid <<<"$status")
    if [[ "$synced" == true && -n "$bpid" ]]; then
      bhost=$(ts_ns_of_pid "$bpid" || echo "?")
      [[ "$bhost" == b ]] || { echo "netns-up.sh: the backup (pid $bpid) runs on host '$bhost', expected b" >&2; false; }
      break
    fi
  fi
  if ((SECONDS >= deadline)); then
    echo "netns-up.sh: no synchronised backup after ${timeout_s}s; last STATUS: ${status:-none}" >&2
    false
  fi
  sleep 0.3
done
trap - ERR INT TERM

echo
echo "tuplespace is up in network namespaces ($(ts_status_summary "$status"))."
echo
row() { printf '  %-8s %-12s %-14s %s\n' "$@"; }
row host namespace address runs
row client "$(ts_ns client)" "${TS_IP[client]}" "clients, nemesis"
row proxy "$(ts_ns proxy)" "${TS_IP[proxy]}" "proxy :$TS_PORT_CLIENT/:$TS_PORT_SERVER/:$TS_PORT_ADMIN$([[ $relay == 1 ]] && echo ", UDP relay :$TS_PORT_RELAY")"
row a "$(ts_ns a)" "${TS_IP[a]}" "primary :$TS_PORT_SHUTDOWN/:$TS_PORT_HEARTBEAT"
row b "$(ts_ns b)" "${TS_IP[b]}" "backup :$TS_PORT_BACKUP"
cat <<EOF

Use it:
  ip netns exec $(ts_ns client) $TUPLESPACE_BIN --certs $TS_CLIENT_CERTS \\
      client --sap $TS_PROXY_SAP --admin-sap $TS_ADMIN_SAP status
  ip netns exec $(ts_ns client) $TUPLESPACE_BIN --certs $TS_CLIENT_CERTS \\
      bench --sap $TS_PROXY_SAP -c 4 -p 4 --mix get=50,put=50 -d 10
  (through the UDP relay, for delay/duplicate/reorder faults: --sap $TS_RELAY_SAP)

Faults:   scripts/fault.sh --help     (e.g. fault.sh kill9 primary; fault.sh cut proxy a; fault.sh heal-all)
Status:   scripts/fault.sh status
Logs:     $TS_STATE_DIR/logs/
Stop:     scripts/netns-down.sh
EOF
