#!/usr/bin/env bash
# Power cuts and crashes of every process under `tuplespace nemesis` load: kill -9 of the
# replicas (or of everything), optionally the unsynced writes dropped by lazyfs, then `tuplespace
# up` again in the same directory; the one nemesis history spans the restart. See docs/FAULTS.md.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: power-cut.sh [--scenario replicas|all] [--rounds N] [--lazyfs] [--fsync always|interval|never]
                    [--duration SECS] [--cut-at SECS] [--clients N] [--keys K] [--op-timeout SECS]
                    [--expect-loss] [--out DIR] [--keep-data]

Each round, in a directory of its own with free loopback ports:
  1. `tuplespace up` (shipped config, every SAP on a free port; `--set fsync=...` if given), waits
     for a primary with a synchronised backup;
  2. `tuplespace nemesis` for --duration seconds (default 60) against it, in the background;
  3. at --cut-at seconds (default 20) the cut:
       replicas  kill -9 of primary and backup (one kill(1) call), then the old proxy is stopped
                 (SIGTERM: it closes its client connections) and the old `up` exits;
       all       kill -9 of `up`, the proxy, the primary and the backup (one kill(1) call);
     with --lazyfs the round's data directory (data/: the replicas' logs and snapshots and the
     proxy's state file) is a lazyfs mount, and right after the kill -9 lazyfs gets SIGUSR1: every
     write not fsynced is dropped, as in a power cut;
  4. `tuplespace up` again in the same directory; a probe client PUTs until one write succeeds
     (recovery time = from the new `up` start to that acknowledgement);
  5. nemesis ends (its final reads go to the restarted service) and checks the whole history:
     linearizability per key, lost and duplicated fresh inserts.
Per round it prints: acknowledged writes (answered writes that changed the space), acknowledged
fresh inserts, lost and duplicated ones, linearizable, recovery time, the copy the new primary
recovered (`recovered the most advanced copy` in the new server's log), torn/corrupt log warnings,
the epoch before and after, nemesis' verdict, and what lazyfs dropped.

  --scenario S     replicas (default) or all
  --rounds N       rounds (default 10)
  --lazyfs         data directory on lazyfs (target/release/examples/lazyfs; built with
                   `cargo build --release --examples` if missing); needs /dev/fuse and root or
                   fusermount3
  --fsync P        --set fsync="P" for every process (default: the shipped config, "always")
  --duration SECS  seconds of nemesis load (default 60)
  --cut-at SECS    seconds into the load when the cut happens (default 20)
  --clients N      nemesis clients (default 4);  --keys K  register keys (default 5)
  --op-timeout S   nemesis: a request unanswered this long is recorded unknown (default 5)
  --expect-loss    the run is meant to lose writes (fsync never on lazyfs): exit 1 if NO round
                   lost or misordered anything
  --out DIR        outputs (default /tmp/ts-power-cut/<scenario>-<date-time>): round-N/ with
                   up-1.log, up-2.log, nemesis/{report.json,history.jsonl}, lazyfs.log; results.md
  --keep-data      keep each round's data directory (deleted after a passing round otherwise)

Exit status: 0 when every round passed (with --expect-loss: when at least one round lost or
misordered writes), 1 otherwise (any lost, duplicated or non-linearizable write with an fsync
policy other than never, a round that could not start or recover), 2 for bad arguments.
Every process and mount it starts is removed at exit, also on Ctrl-C.

Environment: TUPLESPACE_BIN (default target/release/tuplespace), LAZYFS_BIN (default
target/release/examples/lazyfs), TS_CONFIG (default config/tuplespace.toml), TS_BINARY_NOTE (what
the results header says about the binary; default: this checkout's commit).
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TUPLESPACE_BIN:-$ROOT/target/release/tuplespace}
LAZYFS_BIN=${LAZYFS_BIN:-$ROOT/target/release/examples/lazyfs}
CONFIG=${TS_CONFIG:-$ROOT/config/tuplespace.toml}

SCENARIO=replicas
ROUNDS=10
LAZYFS=0
FSYNC=""
DURATION=60
CUT_AT=20
CLIENTS=4
KEYS=5
OP_TIMEOUT=5
EXPECT_LOSS=0
OUT=""
KEEP_DATA=0

die() { echo "power-cut.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --scenario) SCENARIO=${2:?}; shift 2 ;;
    --rounds) ROUNDS=${2:?}; shift 2 ;;
    --lazyfs) LAZYFS=1; shift ;;
    --fsync) FSYNC=${2:?}; shift 2 ;;
    --duration) DURATION=${2:?}; shift 2 ;;
    --cut-at) CUT_AT=${2:?}; shift 2 ;;
    --clients) CLIENTS=${2:?}; shift 2 ;;
    --keys) KEYS=${2:?}; shift 2 ;;
    --op-timeout) OP_TIMEOUT=${2:?}; shift 2 ;;
    --expect-loss) EXPECT_LOSS=1; shift ;;
    --out) OUT=${2:?}; shift 2 ;;
    --keep-data) KEEP_DATA=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case "$SCENARIO" in replicas|all) ;; *) die "--scenario must be replicas or all" ;; esac
case "$FSYNC" in ""|always|interval|never) ;; *) die "--fsync must be always, interval or never" ;; esac
for n in "$ROUNDS" "$DURATION" "$CUT_AT" "$CLIENTS" "$KEYS" "$OP_TIMEOUT"; do
  [[ "$n" =~ ^[0-9]+$ ]] || die "not a whole number: $n"
done
[ "$CUT_AT" -lt "$DURATION" ] || die "--cut-at must be below --duration"
command -v python3 >/dev/null || die "python3 is needed (free ports, reading the reports)"
[ -x "$BIN" ] || die "no tuplespace binary at $BIN (cargo build --release)"
[ -f "$CONFIG" ] || die "no configuration file at $CONFIG"

if [ "$LAZYFS" = 1 ]; then
  [ -e /dev/fuse ] || die "--lazyfs: /dev/fuse does not exist"
  if [ "$(id -u)" != 0 ] && ! command -v fusermount3 >/dev/null && ! command -v fusermount >/dev/null; then
    die "--lazyfs: not root and no fusermount3/fusermount on PATH"
  fi
  if [ ! -x "$LAZYFS_BIN" ]; then
    echo "building lazyfs: cargo build --release --example lazyfs" >&2
    (cd "$ROOT" && cargo build --release --example lazyfs) || die "cannot build lazyfs"
  fi
fi

STAMP=$(date +%Y%m%d-%H%M%S)
if [ -z "$OUT" ]; then
  OUT=/tmp/ts-power-cut/$SCENARIO$([ "$LAZYFS" = 1 ] && echo -lazyfs)$([ -n "$FSYNC" ] && echo "-$FSYNC")-$STAMP
fi
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/results.md

# ------------------------------------------------------------------------------------------------
# Bookkeeping for cleanup: sessions of every `up` we started, the nemesis, the lazyfs mounts.
# ------------------------------------------------------------------------------------------------
SESSIONS=()   # session ids (= pid of each `up`, started with setsid)
NEM_PID=""
LZ_PIDS=()
LZ_MOUNTS=()

now_ms() { date +%s%3N; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# True while PID exists and is not a zombie.
alive() {
  local st
  st=$(awk '{sub(/^.*\) /, ""); print $1}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# Pids (not zombies) in session SID.
session_pids() {
  local sid=$1 p
  for p in $(ps -eo pid=,sid= | awk -v s="$sid" '$2 == s {print $1}'); do
    alive "$p" && echo "$p"
  done
}

# wait_gone DEADLINE_SECS PID...: polls until none of the pids is alive; 1 on timeout.
wait_gone() {
  local secs=$1; shift
  local end=$(( $(now_ms) + secs * 1000 )) p any
  while :; do
    any=0
    for p in "$@"; do alive "$p" && any=1; done
    [ "$any" = 0 ] && return 0
    [ "$(now_ms)" -ge "$end" ] && return 1
    sleep 0.02
  done
}

kill_session() {
  local sid=$1 p
  for p in $(session_pids "$sid"); do kill -9 "$p" 2>/dev/null; done
}

unmount_lazyfs() { # PID MOUNTPOINT
  local pid=$1 mnt=$2
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    wait_gone 15 "$pid" || kill -9 "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  if mountpoint -q "$mnt" 2>/dev/null; then
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null
  fi
}

cleanup() {
  local s i
  if [ -n "$NEM_PID" ] && alive "$NEM_PID"; then kill -9 "$NEM_PID" 2>/dev/null; fi
  for s in "${SESSIONS[@]}"; do kill_session "$s"; done
  for i in "${!LZ_PIDS[@]}"; do unmount_lazyfs "${LZ_PIDS[$i]}" "${LZ_MOUNTS[$i]}"; done
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

# Six free loopback UDP ports (bound together by the OS, then released).
free_ports() {
  python3 - <<'EOF'
import socket
ss = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))
EOF
}

# STATUS as one JSON line (empty if the admin SAP does not answer).
status_json() { # DIR ADMIN_SAP
  "$BIN" client --config "$CONFIG" --certs "$1/certs" --admin-sap "$2" \
    --set connect_timeout_ms=500 --set request_timeout_ms=2000 --json status 2>/dev/null | head -1
}

# Field of a STATUS line: primary_pid, backup_pid, synced, epoch.
status_field() { # JSON FIELD
  python3 -c '
import json, sys
try:
    c = json.loads(sys.argv[1])["cluster"]
except Exception:
    sys.exit(0)
f = sys.argv[2]
if f == "primary_pid": print((c.get("primary") or {}).get("pid", ""))
elif f == "backup_pid": print((c.get("backup") or {}).get("pid", ""))
elif f == "synced": print("yes" if c.get("backup_synced") and c.get("primary") else "no")
elif f == "epoch": print(c.get("epoch", ""))
' "$1" "$2"
}

# Starts `up` in DIR with the round's SAPs in a new session; echoes its pid.
start_up() { # DIR LOGFILE
  local dir=$1 logf=$2 set_args=()
  [ -n "$FSYNC" ] && set_args=(--set "fsync=\"$FSYNC\"")
  (
    cd "$dir" || exit 1
    exec setsid "$BIN" up --config "$CONFIG" --certs certs \
      --client-sap "$CLIENT_SAP" --server-sap "$SERVER_SAP" --shutdown-sap "$ADMIN_SAP" \
      --primary-sap "$PRIMARY_SAP" --backup-sap "$BACKUP_SAP" --heartbeat-sap "$HEARTBEAT_SAP" \
      "${set_args[@]}"
  ) >"$logf" 2>&1 </dev/null &
  echo $!
}

# Polls STATUS until a primary with a synchronised backup (bounded).
wait_ready() { # DIR UP_PID SECS
  local end=$(( $(now_ms) + $3 * 1000 )) st
  while :; do
    alive "$2" || return 1
    st=$(status_json "$1" "$ADMIN_SAP")
    [ "$(status_field "$st" synced)" = yes ] && return 0
    [ "$(now_ms)" -ge "$end" ] && return 1
    sleep 0.05
  done
}

# The proxy child of `up` PID.
proxy_of() {
  local p
  for p in $(ps -o pid= --ppid "$1"); do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q " proxy "; then echo "$p"; return; fi
  done
}

strip_ansi() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }

# ------------------------------------------------------------------------------------------------
# One round
# ------------------------------------------------------------------------------------------------
TOTAL_FAIL=0
ANY_LOSS=0
ROWS=()

round() {
  local n=$1
  local dir=$OUT/round-$n
  local up1 up2 prox prim back st lzpid="" verdict="" note=""
  mkdir -p "$dir/data"
  read -r CLIENT_SAP_P SERVER_SAP_P ADMIN_SAP_P PRIMARY_SAP_P BACKUP_SAP_P HEARTBEAT_SAP_P < <(free_ports)
  CLIENT_SAP=127.0.0.1:$CLIENT_SAP_P SERVER_SAP=127.0.0.1:$SERVER_SAP_P
  ADMIN_SAP=127.0.0.1:$ADMIN_SAP_P PRIMARY_SAP=127.0.0.1:$PRIMARY_SAP_P
  BACKUP_SAP=127.0.0.1:$BACKUP_SAP_P HEARTBEAT_SAP=127.0.0.1:$HEARTBEAT_SAP_P

  if [ "$LAZYFS" = 1 ]; then
    mkdir -p "$dir/lazyfs-backing"
    "$LAZYFS_BIN" "$dir/data" "$dir/lazyfs-backing" >"$dir/lazyfs.log" 2>&1 </dev/null &
    lzpid=$!
    LZ_PIDS+=("$lzpid"); LZ_MOUNTS+=("$dir/data")
    local end=$(( $(now_ms) + 15000 ))
    until grep -q "lazyfs: mounted" "$dir/lazyfs.log" 2>/dev/null && mountpoint -q "$dir/data"; do
      if ! alive "$lzpid" || [ "$(now_ms)" -ge "$end" ]; then
        log "round $n: lazyfs did not mount: $(cat "$dir/lazyfs.log")"; return 1
      fi
      sleep 0.02
    done
  fi

  up1=$(start_up "$dir" "$dir/up-1.log")
  SESSIONS+=("$up1")
  if ! wait_ready "$dir" "$up1" 60; then
    log "round $n: the first cluster never became ready; see $dir/up-1.log"; return 1
  fi
  st=$(status_json "$dir" "$ADMIN_SAP")
  local epoch0; epoch0=$(status_field "$st" epoch)

  "$BIN" nemesis --config "$CONFIG" --certs "$dir/certs" --sap "$CLIENT_SAP" --admin-sap "$ADMIN_SAP" \
    --duration "$DURATION" --clients "$CLIENTS" --keys "$KEYS" --op-timeout "$OP_TIMEOUT" \
    --out "$dir/nemesis" >"$dir/nemesis.out" 2>&1 </dev/null &
  NEM_PID=$!
  local nem_start; nem_start=$(now_ms)

  # Until the cut: the schedule of the experiment (like nemesis' own --fault-at), not a wait for
  # a condition.
  sleep "$CUT_AT" & wait $!   # (wait: a signal interrupts it, so Ctrl-C cleans up at once)
  st=$(status_json "$dir" "$ADMIN_SAP")
  prim=$(status_field "$st" primary_pid)
  back=$(status_field "$st" backup_pid)
  prox=$(proxy_of "$up1")
  if [ -z "$prim" ] || [ -z "$back" ] || [ -z "$prox" ]; then
    log "round $n: before the cut STATUS shows primary='$prim' backup='$back', proxy='$prox': $st"
    return 1
  fi
  case "$SCENARIO" in
    replicas) kill -9 "$prim" "$back" ;;
    all) kill -9 "$up1" "$prox" "$prim" "$back" ;;
  esac
  wait_gone 10 "$prim" "$back" || { log "round $n: replicas still alive 10 s after kill -9"; return 1; }
  if [ -n "$lzpid" ]; then
    local drops; drops=$(grep -c "dropped" "$dir/lazyfs.log")
    kill -USR1 "$lzpid"
    local end=$(( $(now_ms) + 10000 ))
    until [ "$(grep -c "dropped" "$dir/lazyfs.log")" -gt "$drops" ]; do
      if [ "$(now_ms)" -ge "$end" ]; then log "round $n: lazyfs did not report the power cut"; return 1; fi
      sleep 0.01
    done
    note="$(grep "dropped" "$dir/lazyfs.log" | tail -1 | sed 's/^lazyfs: //')"
  fi
  if [ "$SCENARIO" = replicas ]; then
    # The old proxy stops (closing its clients' connections), and with it the old `up`.
    kill -TERM "$prox" 2>/dev/null
    if ! wait_gone 30 "$prox" "$up1"; then
      log "round $n: old proxy/up still running 30 s after SIGTERM; killing them"
      kill_session "$up1"
    fi
  fi
  wait_gone 10 "$up1" "$prox" || kill_session "$up1"
  wait "$up1" 2>/dev/null
  local left; left=$(session_pids "$up1")
  if [ -n "$left" ]; then
    log "round $n: left over after the cut (killed): $left"; kill_session "$up1"
  fi

  # Restart in the same directory; recovery = from here to the first acknowledged probe write.
  local t_up; t_up=$(now_ms)
  up2=$(start_up "$dir" "$dir/up-2.log")
  SESSIONS+=("$up2")
  local t_ok="" end=$(( $(now_ms) + 60000 ))
  while [ "$(now_ms)" -lt "$end" ]; do
    if "$BIN" client --config "$CONFIG" --certs "$dir/certs" --sap "$CLIENT_SAP" \
        --set connect_timeout_ms=250 put "powercut-probe,$n=after-restart" >/dev/null 2>&1; then
      t_ok=$(now_ms); break
    fi
    alive "$up2" || break
  done
  local recovery_ms="-"
  [ -n "$t_ok" ] && recovery_ms=$(( t_ok - t_up ))

  # Nemesis: its load goes on against the restarted service, then the final reads and the check.
  local end=$(( nem_start + (DURATION + OP_TIMEOUT + 120) * 1000 ))
  while alive "$NEM_PID"; do
    if [ "$(now_ms)" -ge "$end" ]; then log "round $n: nemesis did not finish; killed"; kill -9 "$NEM_PID"; fi
    sleep 0.1
  done
  wait "$NEM_PID"; local nem_rc=$?
  NEM_PID=""
  st=$(status_json "$dir" "$ADMIN_SAP")
  local epoch1; epoch1=$(status_field "$st" epoch)

  # Which copy the new primary recovered.
  local rec copy_dir copy_role="none" position="-" replayed="-" warns
  rec=$(strip_ansi "$dir/up-2.log" | grep "recovered the most advanced copy" | head -1)
  if [ -n "$rec" ]; then
    copy_dir=$(sed -n 's/.* dir=\([^ ]*\).*/\1/p' <<<"$rec")
    position=$(sed -n 's/.* position=\(epoch [0-9]*, update [0-9]*\).*/\1/p' <<<"$rec")
    replayed=$(sed -n 's/.* replayed=\([0-9]*\).*/\1/p' <<<"$rec")
    case "$copy_dir" in
      *-"$prim") copy_role="primary's" ;;
      *-"$back") copy_role="backup's" ;;
      *) copy_role="other" ;;
    esac
    copy_role="$copy_role (${copy_dir##*/})"
  else
    copy_role="none: $(strip_ansi "$dir/up-2.log" | grep -o "new replica directory.*" | head -1)"
  fi
  warns=$(strip_ansi "$dir/up-2.log" | grep -c "torn record\|is corrupt")

  # The verdict and the acknowledged writes (answered writes that changed the space: PUT/POST
  # answered applied, DELETE that removed a pair, fresh inserts applied) from nemesis' report and
  # history.
  local summary
  summary=$(python3 - "$dir/nemesis" <<'EOF'
import json, sys, os
d = sys.argv[1]
try:
    r = json.load(open(os.path.join(d, "report.json")))
except Exception as e:
    print("NO-REPORT - - - - - -"); sys.exit(0)
acked = 0
for line in open(os.path.join(d, "history.jsonl")):
    h = json.loads(line)
    o = h["outcome"]
    if "fresh_insert" in h:
        acked += o == "Applied"
    elif h["kind"] != "Get" and (o == "Applied" or (isinstance(o, dict) and o.get("Deleted"))):
        acked += 1
print(r["verdict"], acked, r["fresh_acked"], r["lost"], r["duplicated"],
      r["not_linearizable"] + r["inconclusive"], r["unknown"])
EOF
)
  local nverdict acked fresh lost dup nonlin
  read -r nverdict acked fresh lost dup nonlin _ <<<"$summary"
  local lin=yes; [ "$nonlin" != 0 ] && lin="no ($nonlin keys)"
  verdict=$nverdict
  if [ "$nverdict" = NO-REPORT ] || [ -z "$t_ok" ]; then verdict=ERROR; fi
  if [ "$lost" != 0 ] || [ "$dup" != 0 ] || [ "$nonlin" != 0 ]; then ANY_LOSS=1; fi
  [ "$nem_rc" != 0 ] && [ "$nverdict" = PASS ] && verdict="ERROR(nemesis exit $nem_rc)"

  local row="| $n | $acked | $fresh | $lost | $dup | $lin | $recovery_ms | $copy_role, $position, replayed $replayed | $warns | $epoch0 -> $epoch1 | $verdict | ${note:-} |"
  ROWS+=("$row")
  echo "$row"
  echo "$row" >>"$RESULTS"

  # Stop the restarted service (graceful), unmount, drop the data of a passing round.
  kill -TERM "$up2" 2>/dev/null
  wait_gone 40 "$up2" || kill_session "$up2"
  wait "$up2" 2>/dev/null
  kill_session "$up2"
  if [ -n "$lzpid" ]; then unmount_lazyfs "$lzpid" "$dir/data"; fi
  if [ "$verdict" = PASS ] && [ "$KEEP_DATA" = 0 ]; then
    rm -rf "$dir/data" "$dir/lazyfs-backing"
  fi
  [ "$verdict" = PASS ]
}

# What was tested: TS_BINARY_NOTE if given (e.g. a binary built elsewhere), else this checkout's
# commit (and whether src/ differs from it).
if [ -n "${TS_BINARY_NOTE:-}" ]; then
  BUILD="binary $BIN: $TS_BINARY_NOTE"
else
  COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  DIRTY=$(git -C "$ROOT" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null | head -1)
  BUILD="commit $COMMIT${DIRTY:+ (src differs from it)}"
fi
{
  echo "# power-cut.sh $(date '+%Y-%m-%d %H:%M:%S')"
  echo
  echo "scenario \`$SCENARIO\`, $ROUNDS rounds, lazyfs $([ "$LAZYFS" = 1 ] && echo on || echo off)," \
       "fsync ${FSYNC:-shipped default (always)}; $DURATION s of nemesis load ($CLIENTS clients," \
       "$KEYS keys, op timeout $OP_TIMEOUT s), cut at $CUT_AT s; $BUILD; outputs in $OUT"
  echo
  echo "| round | acknowledged writes | fresh inserts acknowledged | lost | duplicated | linearizable | recovery (ms) | recovered copy | torn/corrupt log warnings | epoch | verdict | lazyfs |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
} >"$RESULTS"
sed -n 1,4p "$RESULTS"
sed -n 5,6p "$RESULTS"

PASSED=0
for ((r = 1; r <= ROUNDS; r++)); do
  if round "$r"; then
    PASSED=$((PASSED + 1))
  else
    TOTAL_FAIL=$((TOTAL_FAIL + 1))
    grep -q "^| $r |" "$RESULTS" || echo "| $r | round did not complete: see $OUT/round-$r | | | | | | | | | ERROR | |" | tee -a "$RESULTS"
  fi
  # Whatever the round left running goes before the next one.
  for s in "${SESSIONS[@]}"; do kill_session "$s"; done
  SESSIONS=()
  for i in "${!LZ_PIDS[@]}"; do unmount_lazyfs "${LZ_PIDS[$i]}" "${LZ_MOUNTS[$i]}"; done
  LZ_PIDS=(); LZ_MOUNTS=()
done

echo | tee -a "$RESULTS"
echo "$PASSED/$ROUNDS rounds passed." | tee -a "$RESULTS"
if [ "$EXPECT_LOSS" = 1 ]; then
  if [ "$ANY_LOSS" = 1 ]; then
    echo "As expected, writes were lost or misordered in at least one round." | tee -a "$RESULTS"
    exit 0
  fi
  echo "EXPECTED LOSS NOT SEEN: no round lost anything." | tee -a "$RESULTS"
  exit 1
fi
[ "$TOTAL_FAIL" = 0 ]
