#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each, one after another, on the
# committed corpus (fuzz/corpus/<target>/, which grows with what the fuzzer finds), then prints
# per target: executions, seconds, corpus files and bytes, and whether it found anything.
#
#   scripts/fuzz.sh [--cmin] [SECONDS] [TARGET...]     # SECONDS defaults to 600
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). Limits per run:
# 2 GiB RSS, 10 s per input; a crash, timeout or out-of-memory stops that target, leaves the
# input in fuzz/artifacts/<target>/ and makes the script exit 1 (the other targets still run).
# --cmin minimises each corpus afterwards (cargo fuzz cmin) before you commit it; reproducers of
# fixed bugs, named fuzz/corpus/<target>/regression-*, are kept as they are.
# Environment: FUZZ_NICE (default 15), FUZZ_LOGS (default target/fuzz-logs), CARGO_TARGET_DIR.
# The short check CI runs instead is the corpus replay: cargo test --release --test fuzz_corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

cmin=0
if [[ "${1:-}" == "--cmin" ]]; then
  cmin=1
  shift
fi
seconds="${1:-600}"
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "usage: $0 [--cmin] [SECONDS] [TARGET...]" >&2; exit 2; }
shift || true
all=(client_frame node_message log_loader snapshot_loader pattern)
targets=("${@:-${all[@]}}")
nice_level="${FUZZ_NICE:-15}"
logs="${FUZZ_LOGS:-target/fuzz-logs}"
mkdir -p "$logs"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: no nightly toolchain; install one with: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz is missing; install it with: cargo install cargo-fuzz --locked" >&2
  exit 2
fi

# The file targets write a small replica directory per input: keep it in memory when we can.
scratch_base=/dev/shm
[[ -d "$scratch_base" && -w "$scratch_base" ]] || scratch_base="${TMPDIR:-/tmp}"
scratch="$(mktemp -d "$scratch_base/tuplespace-fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="$logs/$t.log"
  echo "== $t: $seconds s (log: $log)"
  status=0
  TMPDIR="$scratch" nice -n "$nice_level" cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  # (|| true: a run that stopped early, or never built, prints no statistics)
  execs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)"
  secs="$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | grep -oE 'in [0-9]+' | grep -oE '[0-9]+' | tail -1 || true)"
  peak="$(grep -oE 'stat::peak_rss_mb: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)"
  if [[ $status -ne 0 ]]; then
    failed+=("$t")
    found="FOUND A PROBLEM (exit $status): $(grep -E 'ERROR: libFuzzer|panicked at|^SUMMARY|^error' "$log" | head -2 | tr '\n' ' ' || true)"
  else
    found="nothing found"
  fi
  summary+=("$t: ${execs:-?} executions in ${secs:-?} s, peak RSS ${peak:-?} MB; $found")
done

if [[ $cmin -eq 1 ]]; then
  for t in "${targets[@]}"; do
    echo "== cmin $t"
    # Reproducers of fixed bugs (regression-*) keep their names: cmin renames what it keeps.
    keep="$(mktemp -d "$scratch/keep.XXXXXX")"
    find "fuzz/corpus/$t" -maxdepth 1 -name 'regression-*' -exec mv {} "$keep/" \;
    TMPDIR="$scratch" nice -n "$nice_level" cargo +nightly fuzz cmin "$t" "fuzz/corpus/$t" \
      -- -rss_limit_mb=2048 -timeout=10 >"$logs/$t.cmin.log" 2>&1 \
      || { echo "cmin of $t failed: see $logs/$t.cmin.log" >&2; failed+=("$t (cmin)"); }
    find "$keep" -maxdepth 1 -type f -exec mv {} "fuzz/corpus/$t/" \;
  done
fi

echo "== summary"
for line in "${summary[@]}"; do echo "$line"; done
for t in "${targets[@]}"; do
  files="$(find "fuzz/corpus/$t" -type f | wc -l)"
  bytes="$(du -sb "fuzz/corpus/$t" | cut -f1)"
  echo "corpus $t: $files files, $bytes bytes"
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "problems in: ${failed[*]} (inputs in fuzz/artifacts/; replay one with cargo +nightly fuzz run TARGET FILE)" >&2
  exit 1
fi
