#!/usr/bin/env bash
# The one way the relay is installed (README, docs/operations.md, the Dockerfile, the tests):
#
#   bash scripts/install.sh VENV [LOCK] [--editable | --no-project]
#
# Into the virtualenv VENV go exactly the versions in LOCK (default requirements/runtime.lock),
# every file's hash checked and wheels only, then the relay itself without resolving anything:
# built by the hatchling in requirements/build.lock in a throwaway virtualenv, so no build tool
# stays in VENV; `--editable` installs it from src/ instead, with the hatchling LOCK must then
# hold (requirements/test.lock does); `--no-project` installs LOCK alone (a tool's lock).
# VENV and LOCK are relative to the directory this is run from. A VENV made from another lock is
# made anew, and only a virtualenv (or an empty or missing directory) is ever removed.
# The locks are written by scripts/lock.sh.
set -euo pipefail
usage="usage: scripts/install.sh VENV [LOCK] [--editable | --no-project]"
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(realpath -m "${1:?$usage}")
lock=$(realpath -m "${2:-$root/requirements/runtime.lock}")
project=wheel
case "${3:-}" in
  "") ;;
  --editable) project=editable ;;
  --no-project) project=none ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
[ -f "$lock" ] || { echo "scripts/install.sh: no lock at $lock" >&2; exit 2; }
cd "$root"
PY=${PYTHON:-python3}

stamp="$venv/.installed-from"
want="$(sha256sum "$lock" | cut -d' ' -f1) $project"  # what, not where from
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
    echo "scripts/install.sh: $venv exists and is not a virtualenv; not touching it" >&2
    exit 2
  fi
  rm -rf "$venv"
  if ! "$PY" -c "import ensurepip" 2>/dev/null; then
    # Debian ships venv's pip bootstrap separately; a fresh machine may not have it yet.
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  fi
  "$PY" -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
  "${pip[@]}" install --require-hashes --only-binary=:all: -r "$lock"
  echo "$want" > "$stamp"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
case $project in
  editable) "${pip[@]}" install --no-deps --no-build-isolation -e . ;;
  wheel)
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    "$PY" -m venv "$build/venv"
    "$build/venv/bin/python" -m pip --disable-pip-version-check --no-input -q install \
      --require-hashes --only-binary=:all: -r requirements/build.lock
    "$build/venv/bin/python" -m pip --disable-pip-version-check --no-input -q wheel \
      --no-deps --no-build-isolation -w "$build/dist" .
    "${pip[@]}" install --no-deps --force-reinstall "$build"/dist/*.whl
    ;;
esac
"${pip[@]}" check
