#!/usr/bin/env bash
# Installs the test dependencies into .venv and runs every check CI runs:
# ruff (lint + format), mypy --strict, and the whole pytest suite (unit + end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian ships venv separately; the image may not have it yet.
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    rm -rf .venv && "$PY" -m venv .venv
  fi
fi
# The ACME end-to-end tests run Debian's pebble (a small RFC 8555 test server).
if ! command -v pebble >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq pebble >/dev/null
fi
# The cluster end-to-end tests run Debian's redis-server (tests/e2e/clusterharness.py).
if ! command -v redis-server >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
# systemd-analyze verifies and rates deploy/pyrycode-relay.service (tests/ops/test_deploy_files.py).
if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,fast]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
