#!/usr/bin/env bash
# Runs `tuplespace nemesis` under each fault on a fresh netns topology and tabulates the verdicts.
# See docs/FAULTS.md.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: fault-suite.sh [--short] [--duration SECS] [--extra] [--only NAME,...] [--list]
                      [--clients N] [--keys K] [--out DIR] [--results FILE]

For each scenario: netns-up.sh (fresh topology), `tuplespace nemesis` in ts-client with the fault
(process faults with --fault KIND, network faults with --fault cmd running fault.sh), then
netns-down.sh. The fault starts at 1/3 of the run and is healed at 2/3, except for scenarios
with a fixed fault length (e.g. proxy-stop-3s: healed 3 s after the fault; see --list). Prints a
markdown table (also written to the results file) and exits 1 if any scenario did not PASS,
passed but left the service without a primary and a synchronised backup, or had a fault.sh
fault/heal command fail.

  --short          primary kill -9, primary SIGSTOP and the proxy-a cut, 15 s each
  --duration SECS  seconds of load per scenario (default 30, 60 for the proxy and pause
                   scenarios; 15 with --short). A scenario whose fixed fault outlasts D/3
                   (backup-stop-120s) runs longer: fault at D/3, healed after its length, then
                   D/3 more (160 s for backup-stop-120s at D = 60)
  --extra          also the reverse one-way cuts and the client-path relay faults (delay,
                   duplication, reordering, loss through udp_relay.py)
  --only LIST      only these scenarios (comma separated names, see --list)
  --list           list the scenarios and exit
  --clients N      nemesis clients (default 4)
  --keys K         nemesis keys (default 5)
  --out DIR        per-scenario output: history.jsonl, report.json, nemesis.out, logs/
                   (default /tmp/ts-fault-suite/<date-time>)
  --results FILE   where the markdown table goes (default DIR/results.md)
  --no-recovery-check
                   do not count a scenario as failed when nemesis PASSes but the service is not
                   back to a primary with a synchronised backup 10 s after the run

Environment: TUPLESPACE_BIN, TS_STATE_DIR, TS_NET_PREFIX, ... as for netns-up.sh;
TS_SUITE_UP_TIMEOUT (seconds netns-up.sh may take to get a synchronised backup, default 30).
EOF
}

# name | set (default, short, extra) | nemesis --fault | fault command | heal command | client SAP
#      | fault length | default duration
# (fault/heal commands are fault.sh arguments; sap: direct or relay; fault length: seconds from
# the fault to the heal, empty = a third of the run; default duration: seconds of load when
# neither --duration nor --short is given, empty = 30)
SCENARIOS=(
  "primary-kill9|short|kill-primary|||direct"
  "primary-sigstop|short|stop-primary|||direct"
  "backup-kill9|default|kill-backup|||direct"
  "cut-proxy-a|short|cmd|cut proxy a both|heal proxy a|direct"
  "cut-a-to-proxy|default|cmd|cut a proxy a->proxy|heal a proxy|direct"
  "cut-proxy-b|default|cmd|cut proxy b both|heal proxy b|direct"
  "cut-b-to-proxy|default|cmd|cut b proxy b->proxy|heal b proxy|direct"
  "cut-a-b|default|cmd|cut a b both|heal a b|direct"
  "cut-a-to-b|default|cmd|cut a b a->b|heal a b|direct"
  "loss-10-all|default|cmd|loss-all 10|heal-all|direct"
  "cut-proxy-to-a|extra|cmd|cut proxy a proxy->a|heal proxy a|direct"
  "cut-proxy-to-b|extra|cmd|cut proxy b proxy->b|heal proxy b|direct"
  "cut-b-to-a|extra|cmd|cut a b b->a|heal a b|direct"
  "relay-delay-50ms|extra|cmd|delay 50 20|relay-heal|relay"
  "relay-duplicate-20|extra|cmd|duplicate 20|relay-heal|relay"
  "relay-reorder-30|extra|cmd|reorder 30|relay-heal|relay"
  "relay-loss-10|extra|cmd|relay-loss 10|relay-heal|relay"
  # The proxy and long pauses. proxy-kill-restart: SIGKILL, and the same command line started
  # again at once (fault.sh proxy-restart; the heal step only logs the STATUS seen then).
  "proxy-kill-restart|default|cmd|proxy-restart|status|direct||60"
  "proxy-stop-3s|default|cmd|stop proxy|cont proxy|direct|3|60"
  "proxy-cut-both-3s|default|cmd|cut proxy a,b both|heal proxy a,b|direct|3|60"
  "proxy-cut-one-primary|default|cmd|cut proxy a both|heal proxy a|direct|3|60"
  "proxy-cut-one-backup|default|cmd|cut proxy b both|heal proxy b|direct|3|60"
  "backup-stop-120s|default|cmd|stop backup|cont backup|direct|120|60"
  # The primary paused; its backup was started on the other host by backup_launch_command (as
  # netns-up.sh always does), so it is fenced by a network terminate, not a SIGKILL. Resumed as
  # soon as STATUS shows the promoted backup.
  "primary-stop-launch|default|cmd|stop primary|cont-after-failover 30|direct|0|60"
)

short=0
duration=""
extra=0
only=""
clients=4
keys=5
recovery_check=1
out=""
results=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --short) short=1; shift ;;
    --duration) duration=$2; shift 2 ;;
    --extra) extra=1; shift ;;
    --only) only=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --keys) keys=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --no-recovery-check) recovery_check=0; shift ;;
    --list)
      for s in "${SCENARIOS[@]}"; do
        IFS='|' read -r name set kind fcmd hcmd sap ffor ddur <<<"$s"
        printf '%-22s %-8s %s%s\n' "$name" "$set" "$([[ $kind == cmd ]] && echo "fault.sh $fcmd / fault.sh $hcmd$([[ $sap == relay ]] && echo " (clients via the relay)")" || echo "nemesis --fault $kind")" \
          "$([[ -n "$ffor$ddur" ]] && echo "  [${ffor:+$([[ $ffor == 0 ]] && echo "heal step right after the fault" || echo "healed ${ffor}s after the fault")}${ffor:+${ddur:+, }}${ddur:+${ddur}s by default}]")"
      done
      exit 0
      ;;
    *) echo "fault-suite.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
duration_given=0
[[ -n "$duration" ]] && duration_given=1
[[ -n "$duration" ]] || duration=$([[ $short == 1 ]] && echo 15 || echo 30)
[[ "$duration" =~ ^[0-9]+$ && "$duration" -ge 6 ]] || { echo "fault-suite.sh: --duration must be a whole number >= 6" >&2; exit 2; }

export TS_IGNORE_STATE_ENV=1 # the suite's own environment defines the topology
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
unset TS_IGNORE_STATE_ENV
ts_need_root
ts_check_bin
ts_ensure_python
ts_ensure_iptables
TUPLESPACE_BIN=$(readlink -f "$TUPLESPACE_BIN")
bin_source=$TUPLESPACE_BIN
export TUPLESPACE_BIN TS_STATE_DIR TS_NET_PREFIX TS_NS_PREFIX TS_CONFIG TS_SET
if ! "$TUPLESPACE_BIN" nemesis --help >/dev/null 2>&1; then
  ts_die "$TUPLESPACE_BIN has no \`nemesis\` subcommand: build a tuplespace that has it (cargo build --release)"
fi

# Which scenarios.
selected=()
for s in "${SCENARIOS[@]}"; do
  IFS='|' read -r name set _ <<<"$s"
  if [[ -n "$only" ]]; then
    [[ ",$only," == *",$name,"* ]] && selected+=("$s")
  elif [[ $short == 1 ]]; then
    [[ $set == short ]] && selected+=("$s")
  elif [[ $set != extra || $extra == 1 ]]; then
    selected+=("$s")
  fi
done
if [[ -n "$only" ]]; then
  for n in ${only//,/ }; do
    printf '%s\n' "${SCENARIOS[@]}" | grep -q "^$n|" || ts_die "unknown scenario \`$n\` (see --list)"
  done
fi
[[ ${#selected[@]} -gt 0 ]] || ts_die "no scenario selected"

out=${out:-/tmp/ts-fault-suite/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
results=${results:-$out/results.md}
# One build for the whole suite, even if target/release is rebuilt meanwhile.
if ! cp -f "$TUPLESPACE_BIN" "$out/tuplespace"; then
  ts_die "cannot copy $TUPLESPACE_BIN to $out"
fi
TUPLESPACE_BIN="$out/tuplespace"

fault_at=$((duration / 3))
fault_for=$((duration / 3))

# scenario_timing FAULT_LENGTH DEFAULT_DURATION -> "DURATION FAULT_AT FAULT_FOR" of one scenario:
# load D (the scenario's default unless --duration/--short), fault at D/3, healed after its fixed
# length or D/3; a fault that would outlast the run gets D/3 of load after its heal.
scenario_timing() {
  local ffor=$1 ddur=$2 d at
  d=$duration
  [[ $duration_given == 0 && $short == 0 && -n "$ddur" ]] && d=$ddur
  at=$((d / 3))
  [[ -n "$ffor" ]] || ffor=$((d / 3))
  ((at + ffor + d / 3 > d)) && d=$((at + ffor + d / 3))
  echo "$d $at $ffor"
}

cleanup() {
  "$TS_SCRIPTS_DIR/netns-down.sh" >/dev/null 2>&1 || true
}
trap 'echo "fault-suite.sh: interrupted; tearing down" >&2; cleanup; exit 130' INT TERM

rows=()
failed=0
for s in "${selected[@]}"; do
  IFS='|' read -r name _set kind fcmd hcmd sapkind sffor sddur <<<"$s"
  read -r s_duration s_fault_at s_fault_for < <(scenario_timing "$sffor" "$sddur")
  dir="$out/$name"
  mkdir -p "$dir"
  ts_log "=== scenario $name (${s_duration}s, fault at ${s_fault_at}s for ${s_fault_for}s)"
  verdict="" ops="-" lost="-" dup="-" nonlin="-" unavail="-" epochs="-" after="-" note=""
  timing_note=""
  [[ "$s_duration $s_fault_at $s_fault_for" != "$duration $fault_at $fault_for" ]] &&
    timing_note="${s_duration}s run, fault at ${s_fault_at}s for ${s_fault_for}s"

  if ! "$TS_SCRIPTS_DIR/netns-up.sh" --force --timeout "${TS_SUITE_UP_TIMEOUT:-30}" >"$dir/netns-up.out" 2>&1; then
    verdict="SETUP-FAIL"
    note="netns-up.sh failed (see $dir/netns-up.out)"
  else
    sap=$TS_PROXY_SAP
    [[ $sapkind == relay ]] && sap=$TS_RELAY_SAP
    fault_args=(--fault "$kind")
    if [[ $kind == cmd ]]; then
      f="TS_STATE_DIR='$TS_STATE_DIR' '$TS_SCRIPTS_DIR/fault.sh'"
      # shellcheck disable=SC2086  # the fault.sh arguments, one word each
      fault_args+=(--fault-cmd "$f $(printf '%q ' $fcmd)" --heal-cmd "$f $(printf '%q ' $hcmd)")
    fi
    ts_log "nemesis --fault $kind${fcmd:+ (fault.sh $fcmd / fault.sh $hcmd)} against $sap"
    (cd "$dir" && ip netns exec "$(ts_ns client)" timeout -k 10 $((s_duration + 180)) \
      "$TUPLESPACE_BIN" --certs "$TS_CLIENT_CERTS" --config "$TS_CONFIG" nemesis \
      --sap "$sap" --admin-sap "$TS_ADMIN_SAP" --duration "$s_duration" \
      --clients "$clients" --keys "$keys" "${fault_args[@]}" \
      --fault-at "$s_fault_at" --fault-for "$s_fault_for" --out "$dir" \
      >"$dir/nemesis.out" 2>&1)
    rc=$?
    sed 's/^/    /' "$dir/nemesis.out" | head -n 20 >&2
    # A fault or heal command that failed (report.json's details hold "`CMD` exited exit
    # status: N"): the scenario did not test what it says.
    cmd_failed=""
    if [[ -s "$dir/report.json" ]]; then
      # shellcheck disable=SC2016  # a python program: its backquotes are literal
      cmd_failed=$(python3 -c '
import json, re, sys
out = []
for d in json.load(open(sys.argv[1])).get("details", []):
    m = re.match(r"`(.*)` (exited (exit status: (\d+)|signal.*)|failed to start.*)$", str(d), re.S)
    if m and (m.group(4) is None or m.group(4) != "0"):
        cmd = re.sub(r"^.*fault\.sh\x27? *", "fault.sh ", m.group(1)).strip()
        out.append("`%s` %s" % (cmd, m.group(2)))
print("; ".join(out))' "$dir/report.json" 2>/dev/null || true)
    fi
    # The cluster after the run: does it come back to a primary with a synchronised backup?
    if "$TS_SCRIPTS_DIR/fault.sh" wait-ready 10 >/dev/null 2>&1; then
      after="ok"
    else
      st=$(ts_status_json || true)
      after=$(python3 -c '
import json, sys
try:
    c = json.loads(sys.argv[1])["cluster"]
except Exception:
    print("no STATUS"); sys.exit()
e = c.get("epoch")
if not c.get("primary"):
    print("NO PRIMARY (epoch %s)" % e)
elif not c.get("backup"):
    print("no backup (epoch %s)" % e)
else:
    print("backup not synced (epoch %s)" % e)' "${st:-}")
    fi
    "$TS_SCRIPTS_DIR/fault.sh" status >"$dir/status-after.txt" 2>&1 || true
    if [[ -s "$dir/report.json" ]]; then
      IFS='|' read -r verdict ops lost dup nonlin unavail epochs < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
g = lambda k: r.get(k, "-")
print("|".join(str(x) for x in (g("verdict"), g("ops"), g("lost"), g("duplicated"),
      g("not_linearizable"), g("longest_unavailable_ms"),
      "%s -> %s" % (r.get("epoch_before", "?"), r.get("epoch_after", "?")))))' "$dir/report.json")
      [[ $rc -ne 0 && "$verdict" == PASS ]] && { verdict="ERROR"; note="nemesis exit $rc"; }
    else
      verdict="ERROR"
      note="no report.json (nemesis exit $rc$([[ $rc == 124 ]] && echo ", timed out")): $(grep -v '^ *$' "$dir/nemesis.out" | tail -n 1 | cut -c1-120)"
    fi
  fi
  mkdir -p "$dir/logs"
  cp -r "$TS_STATE_DIR"/logs/*.log "$dir/logs/" 2>/dev/null || true
  cleanup
  if [[ "$verdict" != PASS ]]; then
    failed=$((failed + 1))
    [[ -n "${cmd_failed:-}" ]] && note="fault.sh command failed: ${cmd_failed}${note:+; $note}"
  elif [[ -n "${cmd_failed:-}" ]]; then
    failed=$((failed + 1))
    note="nemesis passed, but a fault.sh command failed: ${cmd_failed}${note:+; $note}"
  elif [[ "$after" != ok && $recovery_check == 1 ]]; then
    failed=$((failed + 1))
    note="nemesis passed, but the service did not get back to a primary with a synchronised backup${note:+; $note}"
  fi
  cmd_failed=""
  [[ -n "$timing_note" ]] && note="${timing_note}${note:+; $note}"
  [[ -n "$note" ]] || note=
  rows+=("| $name | $ops | $lost | $dup | $nonlin | $unavail | $epochs | $after | **$verdict** | ${note:-} |")
  ts_log "=== $name: $verdict"
done

{
  echo "### Fault suite $(date '+%F %T')"
  echo
  rev=$(cd "$TS_REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo '?')
  [[ -n "$(cd "$TS_REPO_DIR" && git status --porcelain 2>/dev/null)" ]] && rev="$rev, with local changes"
  echo "binary \`$bin_source\` ($rev); backup launch mode ${TS_LAUNCH_MODE:-exec}; ${duration}s per scenario, fault at ${fault_at}s for ${fault_for}s (unless the notes say otherwise); $clients clients, $keys keys; outputs in \`$out\`"
  echo
  echo "| scenario | ops | lost | duplicated | not linearizable | longest unavailability (ms) | epoch | cluster after | verdict | notes |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "$((${#rows[@]} - failed))/${#rows[@]} scenarios passed. \"cluster after\": STATUS 10 s after nemesis ended (ok = a primary and a synchronised backup)."
} >"$results"
echo
cat "$results"
echo
echo "results written to $results"
[[ $failed -eq 0 ]]
