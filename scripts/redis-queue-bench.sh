#!/usr/bin/env bash
# The work queue on Redis, for comparison with `tuplespace bench --mix queue`: a Redis primary
# and one replica over mutual TLS (tls-port only, client certificates required, TLS replication),
# P producers LPUSH + WAIT 1, C consumers BRPOP + WAIT 1 (the take is on the replica before it
# counts, as a tuplespace take is replicated before it is answered). A producer waits while
# RQ_BACKLOG jobs (default: C) are acknowledged and not yet taken, so that the latency measures the
# hand-off rather than a queue that grows whenever producers are faster.
#
#   scripts/redis-queue-bench.sh [-- EXTRA ARGS FOR THE LOAD GENERATOR]
#
# Installs redis-server with apt if it is missing, makes a throwaway CA and certificates with
# openssl, builds the load generator (benches/redis-queue), runs it, stops Redis. Prints one line
# (or JSON with `-- --json`): jobs/s taken, latency from a job's acknowledgement (its WAIT
# returned) to its take's answer (p50/p99; 0 when the take was answered first), and the
# exactly-once check (every acknowledged job taken once; exit 1 otherwise).
# Knobs: RQ_PRODUCERS (8), RQ_CONSUMERS (8), RQ_SECONDS (10), RQ_PORT (6390; the replica uses
# +1), RQ_BACKLOG (0 = C), RQ_AOF ("no"; "always" = appendonly with appendfsync always on both, like fsync = "always").
set -euo pipefail

case "${1:-}" in -h | --help) sed -n '2,18p' "$0"; exit 0 ;; esac
[[ "${1:-}" == "--" ]] && shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
P=${RQ_PRODUCERS:-8}
C=${RQ_CONSUMERS:-8}
SECS=${RQ_SECONDS:-10}
PORT=${RQ_PORT:-6390}
AOF=${RQ_AOF:-no}
BACKLOG=${RQ_BACKLOG:-0}
WORK=$(mktemp -d /tmp/redis-queue.XXXXXX)
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

if ! command -v redis-server >/dev/null; then
  echo "installing redis-server with apt" >&2
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get install -y -q redis-server >/dev/null || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null
  }
fi
# apt may start a system instance on 6379; it is not used.

# Throwaway CA, server certificate (localhost, 127.0.0.1) and client certificate.
(
  cd "$WORK"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=redis-queue-bench CA" -keyout ca.key -out ca.crt 2>/dev/null
  for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
      -keyout $who.key -out $who.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >$who.ext
    openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile $who.ext -out $who.crt 2>/dev/null
  done
)

# redis_args PORT DIR: a server on PORT only over TLS, client certificates required.
redis_args() {
  ARGS=(--port 0 --tls-port "$1" --tls-cert-file "$WORK/server.crt" --tls-key-file "$WORK/server.key"
    --tls-ca-cert-file "$WORK/ca.crt" --tls-auth-clients yes --tls-replication yes
    --tls-client-cert-file "$WORK/client.crt" --tls-client-key-file "$WORK/client.key"
    --bind 127.0.0.1 --save "" --dir "$2")
  if [[ "$AOF" == "always" ]]; then
    ARGS+=(--appendonly yes --appendfsync always)
  else
    ARGS+=(--appendonly no)
  fi
}
cli() {
  redis-cli --tls --cacert "$WORK/ca.crt" --cert "$WORK/client.crt" --key "$WORK/client.key" -p "$1" "${@:2}"
}

mkdir -p "$WORK/primary" "$WORK/replica"
redis_args "$PORT" "$WORK/primary"
redis-server "${ARGS[@]}" >"$WORK/primary.log" 2>&1 &
PIDS+=($!)
redis_args $((PORT + 1)) "$WORK/replica"
redis-server "${ARGS[@]}" --replicaof 127.0.0.1 "$PORT" >"$WORK/replica.log" 2>&1 &
PIDS+=($!)

deadline=$((SECONDS + 30))
until cli "$PORT" info replication 2>/dev/null | grep -q 'connected_slaves:1' &&
  cli $((PORT + 1)) info replication 2>/dev/null | grep -q 'master_link_status:up'; do
  if ((SECONDS > deadline)); then
    echo "the Redis pair did not come up with the replica linked in 30 s:" >&2
    tail -n 5 "$WORK/primary.log" "$WORK/replica.log" >&2
    exit 1
  fi
  sleep 0.2
done

cargo build --release --quiet --manifest-path "$ROOT/benches/redis-queue/Cargo.toml"
echo "redis $(redis-server --version | grep -o 'v=[0-9.]*'), mutual TLS, 1 replica, appendonly $AOF, $(nproc) cores, $(date -u +%FT%TZ)" >&2
"$ROOT/benches/redis-queue/target/release/redis-queue" --url "rediss://localhost:$PORT" \
  --ca "$WORK/ca.crt" --cert "$WORK/client.crt" --key "$WORK/client.key" \
  -p "$P" -c "$C" -d "$SECS" --max-backlog "$BACKLOG" "$@"
