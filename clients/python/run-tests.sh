#!/usr/bin/env bash
# Installs the Python client with its test extras in a fresh virtual environment and runs its
# tests against a real `tuplespace up` (the release binary: $TUPLESPACE_BIN, else
# ${CARGO_TARGET_DIR:-target}/release/tuplespace of the repository). Needs network to PyPI only.
# Exit status: pytest's (non-zero if any test fails).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
case "$target" in /*) ;; *) target="$repo/$target" ;; esac
export TUPLESPACE_BIN="${TUPLESPACE_BIN:-$target/release/tuplespace}"
if [ ! -x "$TUPLESPACE_BIN" ]; then
  echo "error: $TUPLESPACE_BIN is not there; run \`cargo build --release\` first (or set TUPLESPACE_BIN)" >&2
  exit 1
fi
python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq python3 python3-venv) >/dev/null 2>&1 || true
fi
venv="$(mktemp -d "${TMPDIR:-/tmp}/tuplespace-pyclient.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
if ! "$python" -m venv "$venv/venv" >/dev/null 2>&1; then
  # Debian/Ubuntu ship venv (ensurepip) separately.
  (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null 2>&1 || true
  "$python" -m venv "$venv/venv"
fi
"$venv/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$here[test]"
cd "$here"
# Every wait in the tests is bounded; the outer bound only guards against a hang in the harness.
timeout --kill-after=10 600 "$venv/venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
