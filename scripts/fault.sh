#!/usr/bin/env bash
# Injects and heals faults in the netns topology of netns-up.sh. See docs/FAULTS.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: fault.sh COMMAND [ARGS...]          (HOST is client, proxy, a or b)

Processes (pids from the proxy's STATUS, else from the namespaces):
  kill9 primary|backup|proxy      SIGKILL the current primary / backup / the proxy
  stop  primary|backup|proxy      SIGSTOP it (pause); the pid is remembered for `cont`
  cont  primary|backup|proxy|all  SIGCONT what `stop` paused (the role it had then), or all
  stop-for primary|backup|proxy SECONDS
                                  SIGSTOP it, wait SECONDS (decimals allowed) in the foreground,
                                  SIGCONT it (also if interrupted)
  cont-after-failover [SECS]      wait (default 30 s) until STATUS shows a new primary (a higher
                                  epoch than when `stop primary` paused the old one, another
                                  pid), then SIGCONT the paused old primary; after SECS it is
                                  resumed anyway and the exit status is 1
  proxy-restart [DELAY]           SIGKILL the proxy, wait until it is gone, wait DELAY seconds
                                  (default 0) and start it again with the command line
                                  netns-up.sh recorded ($TS_STATE_DIR/proxy.cmd): same
                                  arguments, namespace, directory, RUST_LOG, log file. Prints
                                  how long the proxy was down; exit 1 if the new proxy is not
                                  running 0.5 s after its start
  proxy-start                     start the proxy with that command line unless it is running

Links (iptables DROP rules in the receiving host's namespace, chain TSFAULT, by peer address):
  cut HOST1 HOST2 [both|HOST1->HOST2]   drop packets between two hosts: both directions
                                        (default), or only those sent from HOST1 to HOST2.
                                        HOST2 may be a comma list (cut proxy a,b: the proxy
                                        from both server hosts, all rules in one go)
  heal HOST1 HOST2                      remove every cut/loss rule between the two hosts
                                        (HOST2 may be a comma list)
  loss HOST1 HOST2 PERCENT              drop PERCENT % of the packets, each direction
  loss-all PERCENT                      drop PERCENT % of the packets on every link
  heal-all                              remove every link rule, clear the relay's faults, and
                                        SIGCONT every process `stop` paused

Client path through the UDP relay (ts-proxy, 10.77.0.10:7500 -> 10.77.0.10:7400; only clients
pointed at :7500 are affected):
  delay MS [JITTER_MS]            add latency (jitter also reorders)
  duplicate PERCENT               duplicate datagrams
  reorder PERCENT [GAP_MS]        hold PERCENT % of datagrams GAP_MS (15) longer
  relay-loss PERCENT              drop datagrams
  relay-cut up|down|both          drop every datagram client->proxy (up), proxy->client (down)
  relay-heal                      clear every relay fault
  relay start|stop|status         run the relay (netns-up.sh starts it by default)

Other:
  status                          STATUS, processes per host, active rules, relay faults
  wait-ready [--epoch-above N] [SECS]
                                  wait (default 30 s) for a primary and a synchronised backup
                                  (at an epoch above N: after a fault, STATUS may still show the
                                  old cluster for the ~0.3 s failure detection takes)
  epoch                           print the current epoch
  schedule "at T CMD ARGS; ..."   run fault.sh commands at T seconds from now, in order,
                                  e.g. schedule "at 10 cut proxy a; at 30 heal proxy a"

Environment: TS_STATE_DIR (/tmp/ts-netns) and the other settings of netns-up.sh (read back from
$TS_STATE_DIR/env).
EOF
}

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
SELF="$TS_SCRIPTS_DIR/fault.sh"

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
cmd=$1
shift
case "$cmd" in -h | --help | help) usage; exit 0 ;; esac

ts_need_root
ts_topology_up || ts_die "the netns topology is not up (no namespace $(ts_ns proxy) or no $TS_STATE_DIR/env): run scripts/netns-up.sh"

need_host() { ts_is_host "$1" || ts_die "unknown host \`$1\` (client, proxy, a, b)"; }

percent_to_p() {
  # PERCENT (0..100, decimals allowed) -> probability for iptables' statistic match
  python3 -c '
import sys
v = float(sys.argv[1].rstrip("%"))
if not 0 <= v <= 100:
    sys.exit("percentage out of range: %s" % sys.argv[1])
print("%.6f" % (v / 100.0))' "$1" || ts_die "\`$1\` is not a percentage"
}

ipt() { ip netns exec "$(ts_ns "$1")" iptables -w 5 "${@:2}"; }

ensure_chain() {
  ipt "$1" -nL "$TS_CHAIN" >/dev/null 2>&1 || ipt "$1" -N "$TS_CHAIN"
  ipt "$1" -C INPUT -j "$TS_CHAIN" 2>/dev/null || ipt "$1" -I INPUT 1 -j "$TS_CHAIN"
}

# drop_rule RECEIVER SENDER [PROBABILITY]: drop (a fraction of) what RECEIVER gets from SENDER.
drop_rule() {
  local rx=$1 tx=$2 p=${3:-}
  ensure_chain "$rx"
  if [[ -n "$p" ]]; then
    ipt "$rx" -A "$TS_CHAIN" -s "${TS_IP[$tx]}/32" -m statistic --mode random --probability "$p" -j DROP
  else
    ipt "$rx" -A "$TS_CHAIN" -s "${TS_IP[$tx]}/32" -j DROP
  fi
}

# clear_rules RECEIVER SENDER: delete every rule of RECEIVER's chain about SENDER.
clear_rules() {
  local rx=$1 tx=$2 line
  ipt "$rx" -nL "$TS_CHAIN" >/dev/null 2>&1 || return 0
  while read -r line; do
    [[ -n "$line" ]] || continue
    # shellcheck disable=SC2086  # the rule's words, as iptables -S printed them
    ipt "$rx" -D ${line#-A }
  done < <(ipt "$rx" -S "$TS_CHAIN" | grep -E -- "^-A $TS_CHAIN -s ${TS_IP[$tx]//./\\.}/32 " || true)
}

# ---- processes ----------------------------------------------------------------------------

# role_pid ROLE: the pid of the current primary/backup/proxy.
role_pid() {
  local role=$1 st pid=""
  case "$role" in
    proxy)
      pid=$(cat "$TS_STATE_DIR/pids/proxy.pid" 2>/dev/null || true)
      [[ -n "$pid" && -d /proc/$pid ]] || pid=$(ts_tuplespace_pids proxy | head -n1)
      ;;
    primary | backup)
      if st=$(ts_status_json); then
        pid=$(ts_json_get "cluster.$role.pid" <<<"$st")
        [[ -n "$pid" ]] || ts_die "STATUS shows no $role ($(ts_status_summary "$st"))"
      else
        # The proxy does not answer (stopped/killed/cut): guess from the namespaces. A server
        # started as the primary has PRIMARY_HANDLE null; a promoted backup cannot be told apart.
        ts_log "STATUS unavailable; looking for the $role in the server namespaces"
        local p h args
        for h in a b; do
          for p in $(ts_tuplespace_pids "$h"); do
            mapfile -d '' -t args <"/proc/$p/cmdline"
            local i handle=""
            for i in "${!args[@]}"; do [[ "${args[$i]}" == server ]] && handle=${args[$((i + 6))]:-}; done
            if [[ "$role" == primary && "$handle" == null ]] || [[ "$role" == backup && "$handle" != null ]]; then
              pid=$p
            fi
          done
        done
      fi
      ;;
    *) ts_die "unknown process \`$role\` (primary, backup, proxy)" ;;
  esac
  [[ -n "$pid" && -d /proc/$pid ]] || ts_die "no running $role found"
  echo "$pid"
}

describe_pid() { echo "pid $1 on host $(ts_ns_of_pid "$1" || echo '?')"; }

do_signal() {
  local sig=$1 role=$2 pid
  pid=$(role_pid "$role")
  local where epoch st
  epoch=$(st=$(ts_status_json) && ts_json_get cluster.epoch <<<"$st" || echo '?')
  where=$(describe_pid "$pid")
  kill "-$sig" "$pid"
  echo "$role ($where): SIG$sig (epoch was $epoch)"
  [[ "$sig" == STOP ]] && echo "$pid $role $epoch" >>"$TS_STATE_DIR/pids/stopped"
  return 0
}

do_cont() {
  local role=$1 pid r ep done_any=0 rest=()
  if [[ -f "$TS_STATE_DIR/pids/stopped" ]]; then
    while read -r pid r ep; do
      if [[ "$role" == all || "$role" == "$r" ]]; then
        if kill -CONT "$pid" 2>/dev/null; then
          echo "$r ($(describe_pid "$pid")): SIGCONT"
          done_any=1
        fi
      else
        rest+=("$pid $r${ep:+ $ep}")
      fi
    done <"$TS_STATE_DIR/pids/stopped"
    if [[ ${#rest[@]} -gt 0 ]]; then printf '%s\n' "${rest[@]}" >"$TS_STATE_DIR/pids/stopped"; else rm -f "$TS_STATE_DIR/pids/stopped"; fi
  fi
  # Anything else of ours still stopped (e.g. paused by hand) for `all`.
  if [[ "$role" == all ]]; then
    local h
    for h in "${TS_HOSTS[@]}"; do
      for pid in $(ip netns pids "$(ts_ns "$h")" 2>/dev/null); do
        if [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == T ]]; then
          kill -CONT "$pid" 2>/dev/null && echo "pid $pid on host $h: SIGCONT" && done_any=1
        fi
      done
    done
  fi
  [[ $done_any == 1 ]] || echo "nothing to continue for $role"
}

# proc_state PID: the state letter of a process (R, S, T, Z, ...), empty if there is none.
proc_state() { sed -n 's/^.*) \([A-Za-z]\).*$/\1/p' "/proc/$1/stat" 2>/dev/null || true; }

# alive PID: the process exists and is not a zombie.
alive() { local st; st=$(proc_state "$1"); [[ -n "$st" && "$st" != Z && "$st" != X ]]; }

do_stop_for() {
  [[ $# -eq 2 ]] || ts_die "usage: stop-for primary|backup|proxy SECONDS"
  local role=$1 secs=$2
  [[ "$secs" =~ ^[0-9]+(\.[0-9]+)?$ ]] || ts_die "stop-for: \`$secs\` is not a number of seconds"
  do_signal STOP "$role"
  # Resumed even if this is interrupted (the sleep runs in the background so a trapped signal
  # is handled at once).
  trap 'kill "$!" 2>/dev/null; do_cont "$role"; exit 130' INT TERM
  sleep "$secs" &
  wait $!
  trap - INT TERM
  ts_log "stop-for: ${secs}s are over"
  do_cont "$role"
}

do_cont_after_failover() {
  local max=${1:-30} line pid r ep st="" epoch ppid deadline t0
  [[ $# -le 1 && "$max" =~ ^[0-9]+$ ]] || ts_die "usage: cont-after-failover [SECS]"
  line=$(awk '$2 == "primary"' "$TS_STATE_DIR/pids/stopped" 2>/dev/null | tail -n1)
  if [[ -z "$line" ]]; then
    echo "cont-after-failover: no primary was paused by \`fault.sh stop primary\`" >&2
    return 1
  fi
  read -r pid r ep <<<"$line"
  [[ "$ep" =~ ^[0-9]+$ ]] || ep=-1
  t0=$(date +%s%N)
  deadline=$((SECONDS + max))
  while :; do
    if st=$(ts_status_json); then
      epoch=$(ts_json_get cluster.epoch <<<"$st")
      ppid=$(ts_json_get cluster.primary.pid <<<"$st")
      if [[ -n "$ppid" && "$ppid" != "$pid" && ${epoch:-0} -gt $ep ]]; then
        echo "failover seen after $((($(date +%s%N) - t0) / 1000000)) ms of waiting: $(ts_status_summary "$st")"
        do_cont primary
        return 0
      fi
    else
      st=""
    fi
    if ((SECONDS >= deadline)); then
      local seen=unavailable
      [[ -n "$st" ]] && seen=$(ts_status_summary "$st")
      echo "cont-after-failover: no new primary after ${max}s (STATUS: $seen); resuming the old primary anyway" >&2
      do_cont primary
      return 1
    fi
    sleep 0.1
  done
}

# ---- the proxy: restart with the command line netns-up.sh recorded ------------------------

PROXY_CMD_FILE="$TS_STATE_DIR/proxy.cmd"

# proxy_pid: the running proxy's pid (none: empty output).
proxy_pid() {
  local pid
  pid=$(cat "$TS_STATE_DIR/pids/proxy.pid" 2>/dev/null || true)
  if [[ -n "$pid" ]] && alive "$pid"; then
    echo "$pid"
    return 0
  fi
  for pid in $(ts_tuplespace_pids proxy); do
    alive "$pid" && { echo "$pid"; return 0; }
  done
  return 0
}

# start_proxy WHY: starts the proxy in its namespace with the recorded command line, from the
# state directory, appending to logs/proxy.log; records and prints its pid.
start_proxy() {
  [[ -s "$PROXY_CMD_FILE" ]] ||
    ts_die "no recorded proxy command line ($PROXY_CMD_FILE): bring the topology up with this version of netns-up.sh"
  local argv=() pid exe i
  mapfile -d '' -t argv <"$PROXY_CMD_FILE"
  echo "=== $(date '+%F %T') proxy started by fault.sh $1: ${argv[*]:2}" >>"$TS_STATE_DIR/logs/proxy.log"
  # setsid: a session of its own, so that neither a terminal's Ctrl-C nor a `timeout` that kills
  # the process group of whoever ran fault.sh (e.g. nemesis) reaches the new proxy. The
  # background subshell is not a group leader, so setsid does not fork: $! is the proxy's pid
  # (ip netns exec and env exec too).
  (cd "$TS_STATE_DIR" && exec setsid ip netns exec "$(ts_ns proxy)" "${argv[@]}" \
    </dev/null >>"$TS_STATE_DIR/logs/proxy.log" 2>&1) &
  pid=$!
  disown
  echo "$pid" >"$TS_STATE_DIR/pids/proxy.pid"
  # Check (not on the restart's critical path) that $! did become tuplespace.
  for i in $(seq 1 100); do
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    [[ -z "$exe" || "$(basename "$exe")" == tuplespace* ]] && break
    sleep 0.01
  done
  if [[ -n "$exe" && "$(basename "$exe")" != tuplespace* ]]; then
    local p
    p=$(ts_tuplespace_pids proxy | head -n1)
    [[ -n "$p" ]] && pid=$p && echo "$pid" >"$TS_STATE_DIR/pids/proxy.pid"
  fi
  echo "$pid"
}

# check_proxy_up PID START_NS: fails (with the log's tail) if the proxy is not running 0.5 s
# after START_NS.
check_proxy_up() {
  local pid=$1 t0=$2 left
  left=$((500 - ($(date +%s%N) - t0) / 1000000))
  ((left > 0)) && sleep "$(printf '0.%03d' "$left")"
  if ! alive "$pid"; then
    echo "the restarted proxy (pid $pid) is not running; last lines of $TS_STATE_DIR/logs/proxy.log:" >&2
    tail -n 15 "$TS_STATE_DIR/logs/proxy.log" >&2
    return 1
  fi
}

do_proxy_start() {
  [[ $# -eq 0 ]] || ts_die "usage: proxy-start"
  local pid t0
  pid=$(proxy_pid)
  if [[ -n "$pid" ]]; then
    echo "proxy already running (pid $pid)"
    return 0
  fi
  t0=$(date +%s%N)
  pid=$(start_proxy proxy-start)
  check_proxy_up "$pid" "$t0" || return 1
  echo "proxy started (pid $pid, $(describe_pid "$pid"))"
}

do_proxy_restart() {
  [[ $# -le 1 ]] || ts_die "usage: proxy-restart [DELAY_SECONDS]"
  local delay=${1:-0} old new st epoch t_kill t_start i down
  [[ "$delay" =~ ^[0-9]+(\.[0-9]+)?$ ]] || ts_die "proxy-restart: \`$delay\` is not a number of seconds"
  epoch=$(st=$(ts_status_json) && ts_json_get cluster.epoch <<<"$st" || echo '?')
  old=$(proxy_pid)
  t_kill=$(date +%s%N)
  if [[ -n "$old" ]]; then
    kill -KILL "$old"
    for i in $(seq 1 500); do
      alive "$old" || break
      sleep 0.01
    done
    alive "$old" && ts_die "the proxy (pid $old) is still running 5 s after SIGKILL"
    # A paused proxy that was killed is no longer to be resumed.
    if [[ -f "$TS_STATE_DIR/pids/stopped" ]]; then
      awk -v p="$old" '$1 != p' "$TS_STATE_DIR/pids/stopped" >"$TS_STATE_DIR/pids/stopped.tmp"
      mv -f "$TS_STATE_DIR/pids/stopped.tmp" "$TS_STATE_DIR/pids/stopped"
      [[ -s "$TS_STATE_DIR/pids/stopped" ]] || rm -f "$TS_STATE_DIR/pids/stopped"
    fi
  else
    echo "proxy-restart: no proxy running; starting one"
  fi
  [[ "$delay" =~ ^0*(\.0*)?$ ]] || sleep "$delay"
  t_start=$(date +%s%N)
  new=$(start_proxy proxy-restart)
  down=$(((t_start - t_kill) / 1000000))
  echo "proxy: SIGKILL to pid ${old:-none} (epoch was $epoch), restarted as pid $new with the same command line ${down} ms later"
  if ((down >= 1000)); then
    echo "proxy-restart: WARNING: the proxy was down ${down} ms (1 s or more)" >&2
  fi
  check_proxy_up "$new" "$t_start"
}

# ---- links --------------------------------------------------------------------------------

# parse_direction H1 H2 SPEC -> "H1 H2" pairs (sender receiver) on stdout
directions() {
  local h1=$1 h2=$2 spec=${3:-both}
  case "$spec" in
    both) echo "$h1 $h2"; echo "$h2 $h1" ;;
    "$h1->$h2" | oneway | forward) echo "$h1 $h2" ;;
    "$h2->$h1" | backward) echo "$h2 $h1" ;;
    *) ts_die "direction must be both, $h1->$h2 or $h2->$h1 (got \`$spec\`)" ;;
  esac
}

do_cut() {
  if [[ $# -eq 1 && "$1" == *"->"* ]]; then set -- "${1%%->*}" "${1#*->}" "$1"; fi
  [[ $# -ge 2 && $# -le 3 ]] || ts_die "usage: cut HOST1 HOST2[,HOST...] [both|HOST1->HOST2|HOST2->HOST1]"
  local h1=$1 list=$2 spec=${3:-both} h spec_h tx rx pairs=()
  local -a peers
  IFS=',' read -ra peers <<<"$list"
  [[ ${#peers[@]} -ge 1 ]] || ts_die "cut: no second host"
  need_host "$h1"
  for h in "${peers[@]}"; do
    need_host "$h"
    [[ "$h1" != "$h" ]] || ts_die "cut: two different hosts"
    # A direction written with the whole list applies to each of its hosts.
    spec_h=$spec
    [[ "$spec" == "$h1->$list" ]] && spec_h="$h1->$h"
    [[ "$spec" == "$list->$h1" ]] && spec_h="$h->$h1"
    while read -r tx rx; do pairs+=("$tx $rx"); done < <(directions "$h1" "$h" "$spec_h")
  done
  ts_ensure_iptables
  # Chains first, then the DROP rules back to back, so that the cuts start (nearly) together.
  for h in "$h1" "${peers[@]}"; do ensure_chain "$h"; done
  for h in "${pairs[@]}"; do
    read -r tx rx <<<"$h"
    ipt "$rx" -A "$TS_CHAIN" -s "${TS_IP[$tx]}/32" -j DROP
  done
  for h in "${pairs[@]}"; do
    read -r tx rx <<<"$h"
    echo "cut: $tx -> $rx (${TS_IP[$tx]} -> ${TS_IP[$rx]}) dropped"
  done
}

do_heal() {
  [[ $# -eq 2 ]] || ts_die "usage: heal HOST1 HOST2[,HOST...]"
  local h
  local -a peers
  IFS=',' read -ra peers <<<"$2"
  need_host "$1"
  for h in "${peers[@]}"; do need_host "$h"; done
  ts_ensure_iptables
  for h in "${peers[@]}"; do
    clear_rules "$1" "$h"
    clear_rules "$h" "$1"
    echo "healed: $1 <-> $h"
  done
}

do_loss() {
  [[ $# -eq 3 ]] || ts_die "usage: loss HOST1 HOST2 PERCENT"
  need_host "$1"; need_host "$2"
  ts_ensure_iptables
  local p
  p=$(percent_to_p "$3")
  drop_rule "$1" "$2" "$p"
  drop_rule "$2" "$1" "$p"
  echo "loss: ${3%\%}% each way between $1 and $2"
}

do_loss_all() {
  [[ $# -eq 1 ]] || ts_die "usage: loss-all PERCENT"
  ts_ensure_iptables
  local p h
  p=$(percent_to_p "$1")
  for h in "${TS_HOSTS[@]}"; do
    ensure_chain "$h"
    ipt "$h" -A "$TS_CHAIN" -i eth0 -m statistic --mode random --probability "$p" -j DROP
  done
  echo "loss: ${1%\%}% of the packets each host receives, on every link"
}

do_heal_all() {
  local h
  if command -v iptables >/dev/null 2>&1; then
    for h in "${TS_HOSTS[@]}"; do
      ts_ns_exists "$(ts_ns "$h")" || continue
      ipt "$h" -F "$TS_CHAIN" 2>/dev/null || true
    done
    echo "healed: every link rule removed"
  fi
  if [[ -f "$TS_STATE_DIR/relay/control.json" ]]; then
    relay_set_json '{}'
    echo "healed: relay faults cleared"
  fi
  do_cont all
}

# ---- relay --------------------------------------------------------------------------------

relay_pid() {
  local pid
  pid=$(cat "$TS_STATE_DIR/pids/relay.pid" 2>/dev/null || true)
  [[ -n "$pid" && -d /proc/$pid ]] && grep -q udp_relay "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
  return 0
}

relay_start() {
  [[ -n "$(relay_pid)" ]] && { echo "relay already running (pid $(relay_pid)) on $TS_RELAY_SAP"; return 0; }
  ts_ensure_python
  mkdir -p "$TS_STATE_DIR/relay"
  [[ -f "$TS_STATE_DIR/relay/control.json" ]] || echo '{}' >"$TS_STATE_DIR/relay/control.json"
  ip netns exec "$(ts_ns proxy)" python3 "$TS_SCRIPTS_DIR/udp_relay.py" \
    --listen "$TS_RELAY_SAP" --target "$TS_PROXY_SAP" --control "$TS_STATE_DIR/relay/control.json" \
    </dev/null >>"$TS_STATE_DIR/logs/relay.log" 2>&1 &
  local pid=$!
  disown
  echo "$pid" >"$TS_STATE_DIR/pids/relay.pid"
  sleep 0.3
  kill -0 "$pid" 2>/dev/null || ts_die "the relay did not start: see $TS_STATE_DIR/logs/relay.log"
  echo "relay started (pid $pid): point clients at $TS_RELAY_SAP instead of $TS_PROXY_SAP"
}

relay_set_json() {
  local tmp="$TS_STATE_DIR/relay/control.json.tmp"
  echo "$1" >"$tmp"
  mv -f "$tmp" "$TS_STATE_DIR/relay/control.json"
}

# relay_merge KEY=VALUE...: sets some relay parameters, keeping the others.
relay_merge() {
  [[ -n "$(relay_pid)" ]] || relay_start
  local json
  json=$(python3 -c '
import json, sys
path = sys.argv[1]
try:
    cur = json.load(open(path))
except Exception:
    cur = {}
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    try:
        cur[k] = float(v)
    except ValueError:
        cur[k] = v
print(json.dumps(cur, sort_keys=True))' "$TS_STATE_DIR/relay/control.json" "$@")
  relay_set_json "$json"
  echo "relay faults now: $json (client path $TS_RELAY_SAP -> $TS_PROXY_SAP)"
}

is_number() { [[ "$1" =~ ^[0-9]+(\.[0-9]+)?%?$ ]] || ts_die "\`$1\` is not a number"; }

# ---- status, waiting, schedule ------------------------------------------------------------

do_status() {
  local st h pid state
  if st=$(ts_status_json); then
    echo "STATUS: $(ts_status_summary "$st")"
  else
    echo "STATUS: unavailable (proxy not answering within 5 s)"
  fi
  for h in "${TS_HOSTS[@]}"; do
    for pid in $(ip netns pids "$(ts_ns "$h")" 2>/dev/null); do
      state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo '?')
      printf '  %-7s pid %-7s state %s  %s\n' "$h" "$pid" "$state" \
        "$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | cut -c1-110)"
    done
  done
  local rules line
  for h in "${TS_HOSTS[@]}"; do
    rules=$(ipt "$h" -S "$TS_CHAIN" 2>/dev/null | grep '^-A' || true)
    if [[ -n "$rules" ]]; then
      echo "rules in $(ts_ns "$h"):"
      while read -r line; do echo "    $line"; done <<<"$rules"
    fi
  done
  if [[ -n "$(relay_pid)" ]]; then
    echo "relay: pid $(relay_pid), $TS_RELAY_SAP -> $TS_PROXY_SAP, faults $(cat "$TS_STATE_DIR/relay/control.json" 2>/dev/null)"
  else
    echo "relay: not running"
  fi
  if [[ -s "$PROXY_CMD_FILE" ]]; then
    local pcmd=()
    mapfile -d '' -t pcmd <"$PROXY_CMD_FILE"
    echo "proxy command line (proxy-restart): ${pcmd[*]}"
  fi
  echo "proxy state file: ${TS_PROXY_STATE_USED:-not recorded}"
  if [[ -s "$TS_STATE_DIR/pids/stopped" ]]; then
    echo "paused by fault.sh stop (pid role epoch):"
    while read -r line; do echo "    $line"; done <"$TS_STATE_DIR/pids/stopped"
  fi
}

do_wait_ready() {
  local max=30 above=-1 st deadline epoch
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --epoch-above) above=$2; shift 2 ;;
      *) max=$1; shift ;;
    esac
  done
  deadline=$((SECONDS + ${max%.*}))
  while :; do
    if st=$(ts_status_json); then
      epoch=$(ts_json_get cluster.epoch <<<"$st")
      if [[ "$(ts_json_get cluster.backup_synced <<<"$st")" == true &&
        -n "$(ts_json_get cluster.primary.pid <<<"$st")" && ${epoch:-0} -gt $above ]]; then
        echo "ready: $(ts_status_summary "$st")"
        return 0
      fi
    fi
    if ((SECONDS >= deadline)); then
      echo "not ready after ${max}s: $(ts_status_summary "${st:-}")" >&2
      return 1
    fi
    sleep 0.2
  done
}

do_schedule() {
  [[ $# -ge 1 ]] || ts_die 'usage: schedule "at T CMD ARGS; at T CMD ARGS; ..."'
  local plan="$*" step t rest start now wait_s words last=0
  start=$(date +%s.%N)
  IFS=';' read -ra steps <<<"$plan"
  # Check the whole plan first.
  for step in "${steps[@]}"; do
    read -ra words <<<"$step"
    [[ ${#words[@]} -eq 0 ]] && continue
    [[ "${words[0]}" == at && ${#words[@]} -ge 3 && "${words[1]}" =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
      ts_die "schedule: \`$step\` is not \`at SECONDS COMMAND ARGS\`"
    python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)' "${words[1]}" "$last" ||
      ts_die "schedule: times must not go down (\`$step\`)"
    last=${words[1]}
  done
  for step in "${steps[@]}"; do
    read -ra words <<<"$step"
    [[ ${#words[@]} -eq 0 ]] && continue
    t=${words[1]}
    now=$(date +%s.%N)
    wait_s=$(python3 -c 'import sys; print(max(0.0, float(sys.argv[1]) + float(sys.argv[2]) - float(sys.argv[3])))' "$start" "$t" "$now")
    sleep "$wait_s"
    ts_log "schedule t=${t}s: fault.sh ${words[*]:2}"
    "$SELF" "${words[@]:2}" || ts_log "schedule: step \`${words[*]:2}\` failed (exit $?)"
  done
}

case "$cmd" in
  kill9 | kill) [[ $# -eq 1 ]] || ts_die "usage: kill9 primary|backup|proxy"; do_signal KILL "$1" ;;
  stop) [[ $# -eq 1 ]] || ts_die "usage: stop primary|backup|proxy"; do_signal STOP "$1" ;;
  cont) do_cont "${1:-all}" ;;
  stop-for) do_stop_for "$@" ;;
  cont-after-failover) do_cont_after_failover "$@" ;;
  proxy-restart) do_proxy_restart "$@" ;;
  proxy-start) do_proxy_start "$@" ;;
  cut) do_cut "$@" ;;
  heal) do_heal "$@" ;;
  loss) do_loss "$@" ;;
  loss-all) do_loss_all "$@" ;;
  heal-all) do_heal_all ;;
  delay)
    [[ $# -ge 1 && $# -le 2 ]] || ts_die "usage: delay MS [JITTER_MS]"
    is_number "$1"; [[ $# -eq 2 ]] && is_number "$2"
    relay_merge "delay=$1" "jitter=${2:-0}"
    ;;
  duplicate) [[ $# -eq 1 ]] || ts_die "usage: duplicate PERCENT"; is_number "$1"; relay_merge "duplicate=$(percent_to_p "$1")" ;;
  reorder)
    [[ $# -ge 1 && $# -le 2 ]] || ts_die "usage: reorder PERCENT [GAP_MS]"
    is_number "$1"
    if [[ $# -eq 2 ]]; then is_number "$2"; relay_merge "reorder=$(percent_to_p "$1")" "reorder_gap=$2"; else relay_merge "reorder=$(percent_to_p "$1")"; fi
    ;;
  relay-loss) [[ $# -eq 1 ]] || ts_die "usage: relay-loss PERCENT"; is_number "$1"; relay_merge "drop=$(percent_to_p "$1")" ;;
  relay-cut)
    [[ $# -eq 1 && "$1" =~ ^(up|down|both|none)$ ]] || ts_die "usage: relay-cut up|down|both"
    relay_merge "cut_direction=$1"
    ;;
  relay-heal) relay_set_json '{}'; echo "relay faults cleared" ;;
  relay)
    case "${1:-status}" in
      start) relay_start ;;
      stop)
        pid=$(relay_pid)
        if [[ -n "$pid" ]]; then kill "$pid"; echo "relay stopped"; else echo "relay not running"; fi
        ;;
      status) if [[ -n "$(relay_pid)" ]]; then echo "relay pid $(relay_pid): $(cat "$TS_STATE_DIR/relay/control.json")"; else echo "relay not running"; fi ;;
      *) ts_die "usage: relay start|stop|status" ;;
    esac
    ;;
  status) do_status ;;
  epoch) st=$(ts_status_json) || ts_die "STATUS unavailable"; ts_json_get cluster.epoch <<<"$st" ;;
  wait-ready) do_wait_ready "$@" ;;
  schedule) do_schedule "$@" ;;
  *) echo "fault.sh: unknown command \`$cmd\`" >&2; usage >&2; exit 2 ;;
esac
