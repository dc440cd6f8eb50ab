#!/usr/bin/env bash
# Runs every check CI runs (ruff lint + format, mypy --strict, the whole pytest suite, unit
# and end-to-end) on one set of dependency versions, each in a virtualenv of its own:
#
#   bash scripts/test-deps.sh locked [pytest args]   requirements/test.lock, in .venv-test
#   bash scripts/test-deps.sh lowest [pytest args]   requirements/lowest.lock (every direct
#                                                    dependency at its lower bound), .venv-lowest
#   bash scripts/test-deps.sh newest [pytest args]   the newest versions the index serves within
#                                                    pyproject.toml's ranges, resolved now, .venv-newest
#
# `locked` and `lowest` are deterministic (committed locks); `newest` is what next month's lock
# would be. Also installs the system programs the end-to-end tests run, when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=${1:?usage: scripts/test-deps.sh locked|lowest|newest [pytest args]}
shift
case $deps in
  locked) venv=.venv-test lock=requirements/test.lock ;;
  lowest) venv=.venv-lowest lock=requirements/lowest.lock ;;
  newest)
    venv=.venv-newest
    source scripts/uv.sh
    lock=$(mktemp --suffix=.lock)
    trap 'rm -f "$lock"' EXIT
    "$UV" pip compile pyproject.toml requirements/build.in requirements/editable.in --extra test --extra fast \
      "${UV_TARGET[@]}" --upgrade -o "$lock"
    ;;
  *) echo "scripts/test-deps.sh: unknown set '$deps' (want locked, lowest or newest)" >&2; exit 2 ;;
esac

apt_install() {
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# The ACME end-to-end tests run Debian's pebble (a small RFC 8555 test server).
command -v pebble >/dev/null || apt_install pebble
# The cluster end-to-end tests run Debian's redis-server (tests/e2e/clusterharness.py).
command -v redis-server >/dev/null || apt_install redis-server
# promtool (Debian's prometheus package) checks deploy/alerts.yml and a live /metrics scrape
# (tests/ops/test_alerts.py).
command -v promtool >/dev/null || apt_install prometheus
# systemd-analyze verifies and rates deploy/pyrycode-relay.service (tests/ops/test_deploy_files.py).
if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ]; then apt_install systemd; fi

bash scripts/install.sh "$venv" "$lock" --editable
installed=$("$venv/bin/python" -m pip freeze --exclude-editable)
echo "== $deps: $(grep -ciE '^[a-z0-9]' <<<"$installed") packages;" \
  "$(grep -E '^(redis|websockets|cryptography|acme|pytest)==' <<<"$installed" | tr '\n' ' ')"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
"$venv/bin/python" -m pytest "$@"
