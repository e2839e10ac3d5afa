#!/usr/bin/env bash
# Write throughput and latency with fsync = "always" beside "never", measured in one run.
#
#   scripts/bench-fsync.sh [TUPLESPACE_BINARY]
#
# For each point (C connections x P in flight) it starts `tuplespace up` in a fresh scratch
# directory with one policy, runs `tuplespace bench --mix put=100` (fresh keys: every request is a
# replicated, logged write), stops the service, then does the same with the other policy, so the
# two figures of a point are taken minutes apart at most. Each figure starts on a settled disk
# (see settle()): run it on an otherwise idle machine. Prints one table with the ratios.
# Knobs: BF_POINTS ("1,1 16,1 16,16 64,16"), BF_SECONDS (6), BF_ROUNDS (1: repeat every point),
# BF_PORT (base port, 7600).
set -euo pipefail

case "${1:-}" in -h | --help) sed -n '2,11p' "$0"; exit 0 ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TS=$(realpath "${1:-$ROOT/target/release/tuplespace}")
POINTS=${BF_POINTS:-"1,1 16,1 16,16 64,16"}
SECONDS_EACH=${BF_SECONDS:-6}
ROUNDS=${BF_ROUNDS:-1}
PORT=${BF_PORT:-7600}
# The shipped config's log segment size (settle() waits for a segment of this size).
WAL_SEGMENT_BYTES=$(sed -n 's/^wal_segment_bytes *= *\([0-9]*\).*/\1/p' "$ROOT/config/tuplespace.toml")
WAL_SEGMENT_BYTES=${WAL_SEGMENT_BYTES:-0}
SCRATCH=$(mktemp -d /tmp/bench-fsync.XXXXXX)
UP_PID=""

cleanup() {
  if [[ -n "$UP_PID" ]]; then
    kill -TERM "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
  fi
  pkill -f -- "--client-sap 127.0.0.1:$PORT" 2>/dev/null || true
  rm -rf "$SCRATCH"
}
trap cleanup EXIT

saps() {
  echo --client-sap 127.0.0.1:$PORT --server-sap 127.0.0.1:$((PORT + 1)) \
    --shutdown-sap 127.0.0.1:$((PORT + 2)) --primary-sap 127.0.0.1:$((PORT + 10)) \
    --backup-sap 127.0.0.1:$((PORT + 11)) --heartbeat-sap 127.0.0.1:$((PORT + 12))
}

# start_up POLICY DIR: starts `up`, waits (bounded) until a write is acknowledged with a backup
# attached and synchronised.
start_up() {
  local policy=$1 dir=$2
  mkdir -p "$dir"
  cp -r "$ROOT/config" "$dir/"
  (cd "$dir" && exec "$TS" up $(saps) --set "fsync=\"$policy\"" >up.log 2>&1) &
  UP_PID=$!
  local deadline=$((SECONDS + 30))
  until (cd "$dir" && "$TS" client --json --sap 127.0.0.1:$PORT --admin-sap 127.0.0.1:$((PORT + 2)) status 2>/dev/null) |
    grep -q '"backup_synced":true'; do
    if ((SECONDS > deadline)); then
      echo "service with fsync=$policy did not come up with a synchronised backup; see $dir/up.log" >&2
      tail -20 "$dir/up.log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

ports_busy() {
  ss -Hlun | grep -Eq "127\.0\.0\.1:($PORT|$((PORT + 1))|$((PORT + 2))|$((PORT + 10))|$((PORT + 11))|$((PORT + 12))) "
}

# stop_up: Ctrl-C equivalent (SHUTDOWN, save), then waits (bounded) until every port is free.
stop_up() {
  kill -TERM "$UP_PID" 2>/dev/null || true
  wait "$UP_PID" 2>/dev/null || true
  UP_PID=""
  local deadline=$((SECONDS + 20))
  while ports_busy; do
    if ((SECONDS > deadline)); then
      pkill -9 -f -- "127.0.0.1:$((PORT + 1)) " 2>/dev/null || true
    fi
    sleep 0.1
  done
}

# settle DIR: waits (bounded) until every replica's log has moved to a preallocated segment and
# its next spare is ready, then writes back every dirty page on the machine (`sync`). Otherwise
# the first seconds of a figure measure start-up work, not the steady state: two replicas each
# zero-fill two 16 MiB spares in the background (the log appends to a growing, unpreallocated
# segment meanwhile, whose every fdatasync commits metadata too), and the previous figure's
# `never` run leaves megabytes of log for the kernel to write back. Either queues in front of
# the fdatasync of every write and is charged to `always` alone.
settle() {
  local dir=$1 deadline=$((SECONDS + 30)) n=0
  while :; do
    local ready=0 replicas=0
    for r in $(find "$dir" -maxdepth 3 -type d -name 'replica-*' 2>/dev/null); do
      replicas=$((replicas + 1))
      local seg
      seg=$(find "$r" -maxdepth 1 -name 'wal-*' -printf '%f\n' | sort -V | tail -1)
      if [[ -f "$r/wal.spare" && ! -e "$r/wal.spare.tmp" && -n "$seg" ]] &&
        (($(stat -c %s "$r/$seg") >= WAL_SEGMENT_BYTES)); then
        ready=$((ready + 1))
      fi
    done
    ((replicas >= 2 && ready == replicas)) && break
    if ((SECONDS > deadline)); then
      echo "logs in $dir did not reach a preallocated segment with a spare ready in 30 s; measuring anyway" >&2
      break
    fi
    # A write moves a log whose spare is ready onto it.
    (cd "$dir" && "$TS" client --sap 127.0.0.1:$PORT put "settle,$n=1" >/dev/null 2>&1) || true
    n=$((n + 1))
    sleep 0.2
  done
  sync
}

# measure POLICY C P ROUND -> prints "ops p50_us p99_us"
measure() {
  local policy=$1 c=$2 p=$3 r=$4 dir="$SCRATCH/$1-$2x$3-$4"
  start_up "$policy" "$dir"
  settle "$dir"
  (cd "$dir" && "$TS" bench --sap 127.0.0.1:$PORT -c "$c" -p "$p" --mix put=100 -d "$SECONDS_EACH" \
    --no-preload --json 2>/dev/null) | python3 -c '
import json,sys
r=json.load(sys.stdin)
op=[o for o in r["ops"] if o["op"].upper()=="PUT"][0]
print(int(r["total_ops_per_sec"]), op["p50_us"], op["p99_us"], r.get("errors",0))'
  stop_up
}

echo "commit $(cd "$ROOT" && git rev-parse --short HEAD), $(date -u +%FT%TZ), $(nproc) cores, ${SECONDS_EACH}s per figure"
printf "%-8s | %-30s | %-30s | %s\n" "(C,P)" "fsync=always ops/s p50/p99 µs" "fsync=never ops/s p50/p99 µs" "always/never ops, p50 ratio"
for ((round = 1; round <= ROUNDS; round++)); do
  for pt in $POINTS; do
    c=${pt%,*}
    p=${pt#*,}
    # Command substitution waits for the service to stop before the next one starts.
    a=$(measure always "$c" "$p" "$round")
    n=$(measure never "$c" "$p" "$round")
    read -r a_ops a_p50 a_p99 a_err <<<"$a"
    read -r n_ops n_p50 n_p99 n_err <<<"$n"
    ratio=$(python3 -c "print(f'{$a_ops/$n_ops:.2f}, {$a_p50/$n_p50:.2f}x')")
    printf "%-8s | %-30s | %-30s | %s\n" "($c,$p)" "$a_ops ${a_p50}/${a_p99} (err $a_err)" \
      "$n_ops ${n_p50}/${n_p99} (err $n_err)" "$ratio"
  done
done
