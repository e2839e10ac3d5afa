#!/usr/bin/env bash
# Runs a command inside the network namespace that owns an IP address of the netns topology;
# used as tuplespace's backup_launch_command so that a backup (of any epoch) starts on the host
# named by {backup_host}.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ns-exec-by-ip.sh [--state DIR] [--no-certs-rewrite] [--no-log] [--detach] IP|auto COMMAND [ARGS...]

Runs COMMAND in the network namespace of the host owning IP (one of the netns-up.sh hosts),
replacing this process (exec: the caller's child pid *is* the command), so it can be used as

  backup_launch_command = "exec scripts/ns-exec-by-ip.sh {backup_host} /path/tuplespace {args}"

The primary fills {backup_host} with the IP of its BACKUP_SAP; after a promotion across hosts that
is the old primary's host, so backups always land on the host the primary is not on.

When ARGS are `server SHUTDOWN_SAP PROXY_SAP BACKUP_SAP ...`, the host of BACKUP_SAP decides: IP
`auto` means exactly that, and an IP that disagrees with BACKUP_SAP is overridden with a warning.
(tuplespace also substitutes {backup_host} inside the `--set backup_launch_command=...` it passes
on in {args}, so a promoted backup's template carries a stale, hard-coded IP; the BACKUP_SAP in
the arguments is always right.)

  --state DIR         state directory of netns-up.sh (default $TS_STATE_DIR or /tmp/ts-netns)
  --no-certs-rewrite  keep ARGS' `--certs DIR` as given. By default every `--certs X` (or
                      --certs=X) in ARGS becomes DIR/certs/HOST: {args} carries the launching
                      primary's own --certs (its host's node certificate, whose SAN is the wrong
                      IP here), and clap lets the last --certs win, so it cannot be overridden by
                      a flag placed before {args}.
  --no-log            keep stdout/stderr; by default they are appended to DIR/logs/server-HOST.log
                      (one log per host, every server that ever ran there)
  --detach            do not exec: run COMMAND as a child and wait for it, so that a SIGKILL of
                      the pid the launching primary tracks does not reach the server (models a
                      launcher, e.g. ssh without a tty, whose death leaves the remote process
                      running). SIGTERM/SIGINT are passed on. Default: exec (the tracked pid is
                      the server's, as when the backup is a local child).
EOF
}

state=""
rewrite=1
log=1
detach=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --state) state=$2; shift 2 ;;
    --no-certs-rewrite) rewrite=0; shift ;;
    --no-log) log=0; shift ;;
    --detach) detach=1; shift ;;
    --) shift; break ;;
    -*) echo "ns-exec-by-ip.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
[[ -n "$state" ]] && export TS_STATE_DIR=$state
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

ip_addr=$1
shift
# BACKUP_SAP of a `tuplespace server` command line: third positional after `server`.
sap_ip=""
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == server ]]; then
    j=$((i + 3))
    if [[ $j -le $# ]]; then
      sap_ip=${!j}
      sap_ip=${sap_ip%:*}
      sap_ip=${sap_ip#[}
      sap_ip=${sap_ip%]}
    fi
    break
  fi
done
warning=""
if [[ "$ip_addr" == auto ]]; then
  [[ -n "$sap_ip" ]] || { echo "ns-exec-by-ip.sh: auto: no \`server ... BACKUP_SAP\` in the command" >&2; exit 2; }
  ip_addr=$sap_ip
elif [[ -n "$sap_ip" && "$sap_ip" != "$ip_addr" ]]; then
  warning="ns-exec-by-ip.sh: WARNING: asked for host $ip_addr but the command's BACKUP_SAP is on $sap_ip; using $sap_ip (a stale {backup_host} substituted into the passed-on backup_launch_command)"
  ip_addr=$sap_ip
fi
host=$(ts_host_of_ip "$ip_addr") || {
  echo "ns-exec-by-ip.sh: $ip_addr is not an address of the netns topology (${TS_IP[*]})" >&2
  exit 3
}
ns=$(ts_ns "$host")
ts_ns_exists "$ns" || { echo "ns-exec-by-ip.sh: namespace $ns does not exist" >&2; exit 3; }

args=()
while [[ $# -gt 0 ]]; do
  if [[ $rewrite == 1 && "$1" == --certs && $# -ge 2 ]]; then
    args+=(--certs "$TS_STATE_DIR/certs/$host")
    shift 2
  elif [[ $rewrite == 1 && "$1" == --certs=* ]]; then
    args+=("--certs=$TS_STATE_DIR/certs/$host")
    shift
  else
    args+=("$1")
    shift
  fi
done

if [[ $log == 1 ]]; then
  mkdir -p "$TS_STATE_DIR/logs"
  exec >>"$TS_STATE_DIR/logs/server-$host.log" 2>&1
fi
mkdir -p "$TS_STATE_DIR/pids"
if [[ $detach == 1 ]]; then
  ip netns exec "$ns" "${args[@]}" &
  child=$!
  echo "$child $host $(date +%s)" >>"$TS_STATE_DIR/pids/launched"
  echo "=== $(date '+%F %T') pid $child (detached; launcher pid $$) in $ns: ${args[*]}"
  [[ -n "$warning" ]] && echo "$warning"
  trap 'kill -TERM "$child" 2>/dev/null' TERM
  trap 'kill -INT "$child" 2>/dev/null' INT
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || exit "$rc"
  done
fi
# This pid stays the command's pid (exec below): recorded so netns-down.sh can find every backup.
echo "$$ $host $(date +%s)" >>"$TS_STATE_DIR/pids/launched"
echo "=== $(date '+%F %T') pid $$ in $ns: ${args[*]}"
[[ -n "$warning" ]] && echo "$warning"
exec ip netns exec "$ns" "${args[@]}"
