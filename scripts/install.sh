#!/usr/bin/env bash
# The one way the relay is installed (README, docs/operations.md, the Dockerfile, the tests):
# into the virtualenv VENV (created if missing) go exactly the versions in LOCK, every file's
# hash checked and wheels only (nothing is built from source), then the project itself with
# no dependency resolution of its own, built by the hatchling pinned in LOCK.
#
#   bash scripts/install.sh VENV [LOCK] [--editable]
#
# LOCK defaults to requirements/runtime.lock (the relay and uvloop); the tests use
# requirements/test.lock. A VENV made from another lock is made anew, so nothing is left
# over from it. The locks are written by scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: scripts/install.sh VENV [LOCK] [--editable]}
lock=${2:-requirements/runtime.lock}
editable=()
[ "${3:-}" = --editable ] && editable=(-e)
stamp="$venv/.installed-from"
want="$(sha256sum "$lock" | cut -d' ' -f1) ${editable[*]}"  # what, not where from
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0  # already exactly this lock
fi
rm -rf "$venv"
PY=${PYTHON:-python3}
if ! "$PY" -m venv "$venv" 2>/dev/null; then
  # Debian ships venv separately; a fresh machine may not have it yet.
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  rm -rf "$venv" && "$PY" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
"${pip[@]}" install --require-hashes --only-binary=:all: -r "$lock"
"${pip[@]}" install --no-deps --no-build-isolation "${editable[@]}" .
"${pip[@]}" check
echo "$want" > "$stamp"
