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

# System programs the end-to-end tests run, installed together (one apt-get update) when any
# is missing:
#   pebble        the ACME tests (a small RFC 8555 test server)
#   redis-server  the cluster tests (tests/e2e/clusterharness.py)
#   haproxy nginx the balancer tests (tests/e2e/test_balancer.py); Debian puts both in /usr/sbin
#   promtool      (Debian's prometheus) checks deploy/alerts.yml and a live scrape
#   systemd       systemd-analyze verifies and rates deploy/pyrycode-relay.service (root only)
missing=()
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
for program in pebble redis-server haproxy nginx; do have "$program" || missing+=("$program"); done
have promtool || missing+=(prometheus)
if ! have systemd-analyze && [ "$(id -u)" = 0 ]; then missing+=(systemd); fi
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash scripts/install.sh "$venv" "$lock" --editable
installed=$("$venv/bin/python" -m pip freeze --exclude-editable)
echo "== $deps: $(grep -ciE '^[a-z0-9]' <<<"$installed") packages;" \
  "$(grep -E '^(redis|websockets|cryptography|acme|pytest)==' <<<"$installed" | tr '\n' ' ')"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
"$venv/bin/python" -m pytest "$@"
