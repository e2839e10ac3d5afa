#!/usr/bin/env bash
# Checks the unit files in deploy/systemd/ with `systemd-analyze verify`.
#
# The units run /usr/local/bin/tuplespace, which verify requires to exist; the check runs on
# copies whose ExecStart names a stand-in executable instead, so it needs no installed binary.
# verify exits 0 on many mistakes it only warns about (an unknown key, a value it cannot parse and
# ignores), so any line it prints counts as a failure here.
#
# Exit status: 0 all units verified (or systemd-analyze is not installed: prints SKIPPED),
# 1 verify reported something (printed).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "SKIPPED: systemd-analyze is not installed (apt-get install systemd), units not verified"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stand_in="$tmp/tuplespace"
printf '#!/bin/sh\nexit 0\n' >"$stand_in"
chmod 755 "$stand_in"

units=()
for f in deploy/systemd/*.service; do
  name=$(basename "$f")
  grep -q '^ExecStart=/usr/local/bin/tuplespace ' "$f" || {
    echo "$f: ExecStart does not run /usr/local/bin/tuplespace (the path docs/OPERATIONS.md installs to)"
    exit 1
  }
  sed "s#/usr/local/bin/tuplespace#$stand_in#g" "$f" >"$tmp/$name"
  units+=("$tmp/$name")
done
if [ "${#units[@]}" -eq 0 ]; then
  echo "no unit files in deploy/systemd/"
  exit 1
fi

set +e
out=$(systemd-analyze verify --man=no "${units[@]}" 2>&1)
rc=$?
set -e
if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
  echo "systemd-analyze verify (exit $rc) reports on deploy/systemd/:"
  printf '%s\n' "${out//$tmp\//deploy/systemd/}"
  exit 1
fi
echo "verified ${#units[@]} units with $(systemd-analyze --version | head -1): $(cd deploy/systemd && echo *.service)"
