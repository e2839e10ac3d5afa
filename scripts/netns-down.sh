#!/usr/bin/env bash
# Tears down what netns-up.sh built. Idempotent: safe after a failed or partial run, and when
# nothing exists.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: netns-down.sh [--graceful] [--purge]

Kills every process netns-up.sh started and every backup launched since (found by namespace with
`ip netns pids`, and by the pid records in the state directory), deletes the namespaces (their
veths, the bridge and their iptables rules go with them) and any leftover link in the root
namespace. Logs stay in $TS_STATE_DIR/logs unless --purge.

  --graceful  first ask the service to save and stop (admin SHUTDOWN, 10 s at most)
  --purge     also delete the state directory
EOF
}

graceful=0
purge=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --graceful) graceful=1; shift ;;
    --purge) purge=1; shift ;;
    *) echo "netns-down.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ts_need_root

namespaces=()
for h in "${TS_HOSTS[@]}" sw; do namespaces+=("$(ts_ns "$h")"); done

if [[ $graceful == 1 && -x "$TUPLESPACE_BIN" ]] && ts_ns_exists "$(ts_ns client)"; then
  echo "asking the service to shut down (saves $TS_STATE_DIR/data/space.json)"
  ip netns exec "$(ts_ns client)" timeout -k 1 10 "$TUPLESPACE_BIN" --certs "$TS_CLIENT_CERTS" \
    --config "$TS_CONFIG" client --sap "$TS_PROXY_SAP" --admin-sap "$TS_ADMIN_SAP" shutdown || true
  sleep 1
fi

# A pid from our records is killed only if it still is one of ours (pid reuse).
ours() {
  local cmd
  cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ "$cmd" == *tuplespace* || "$cmd" == *udp_relay.py* || "$cmd" == *ns-exec-by-ip.sh* ]]
}

kill_all() {
  local sig=$1 n p
  local -A pids=()
  for n in "${namespaces[@]}"; do
    ts_ns_exists "$n" || continue
    for p in $(ip netns pids "$n" 2>/dev/null); do pids[$p]=1; done
  done
  if [[ -d "$TS_STATE_DIR/pids" ]]; then
    for p in $(cat "$TS_STATE_DIR"/pids/*.pid 2>/dev/null) \
      $(awk '{print $1}' "$TS_STATE_DIR/pids/launched" "$TS_STATE_DIR/pids/stopped" 2>/dev/null); do
      [[ "$p" =~ ^[0-9]+$ ]] && [[ -d /proc/$p ]] && ours "$p" && pids[$p]=1
    done
  fi
  local killed=0
  for p in "${!pids[@]}"; do
    kill "-$sig" "$p" 2>/dev/null && killed=$((killed + 1))
  done
  echo "$killed"
}

n=$(kill_all KILL)
[[ "$n" -gt 0 ]] && echo "killed $n process(es)"
# Wait (bounded) until nothing is left in the namespaces, so their deletion frees them.
for _ in $(seq 1 50); do
  left=0
  for ns in "${namespaces[@]}"; do
    ts_ns_exists "$ns" || continue
    [[ -n "$(ip netns pids "$ns" 2>/dev/null)" ]] && left=1
  done
  [[ $left == 0 ]] && break
  kill_all KILL >/dev/null
  sleep 0.1
done

deleted=()
for ns in "${namespaces[@]}"; do
  if ts_ns_exists "$ns"; then
    ip netns del "$ns" 2>/dev/null || ip netns del "$ns" || echo "warning: could not delete namespace $ns" >&2
    deleted+=("$ns")
  fi
done
[[ ${#deleted[@]} -gt 0 ]] && echo "deleted namespaces: ${deleted[*]}"

# Leftovers in the root namespace (an interrupted run of an older layout): veths and bridge.
for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 |
  grep -E "^(v-(client|proxy|a|b)|${TS_NS_PREFIX}(br|sw|client|proxy|a|b)[0-9]*)$"); do
  ip link del "$l" 2>/dev/null && echo "deleted root-namespace link $l"
done

if [[ -d "$TS_STATE_DIR" ]]; then
  rm -f "$TS_STATE_DIR"/pids/*.pid "$TS_STATE_DIR/pids/launched" "$TS_STATE_DIR/relay/control.json"
  [[ -f "$TS_STATE_DIR/env" ]] && mv -f "$TS_STATE_DIR/env" "$TS_STATE_DIR/env.last"
  if [[ $purge == 1 ]]; then
    rm -rf "${TS_STATE_DIR:?}"
    echo "removed $TS_STATE_DIR"
  fi
fi
echo "netns topology is down"
exit 0
