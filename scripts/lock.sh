#!/usr/bin/env bash
# Writes the committed locks in requirements/ from pyproject.toml and requirements/build.in:
#   test.lock     what the test command installs: the relay, its fast and test extras, and
#                 what an editable install builds with (build.in, editable.in)
#   runtime.lock  what the README, docs/operations.md and the Dockerfile install: the relay,
#                 its fast extra and hatchling, at the versions test.lock has
#   lowest.lock   the test set with every direct dependency at the lowest version its range in
#                 pyproject.toml allows (scripts/test.sh runs the suite on it too)
#
#   bash scripts/lock.sh             keep each locked version that still fits the ranges
#   bash scripts/lock.sh --upgrade   move to the newest versions the index serves
#
# After either, run `bash scripts/test.sh` and commit the locks with what made them pass.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/uv.sh
inputs=(pyproject.toml requirements/build.in)
tests=("${inputs[@]}" requirements/editable.in)
"$UV" pip compile "${tests[@]}" --extra test --extra fast "${UV_TARGET[@]}" "$@" \
  -o requirements/test.lock
"$UV" pip compile "${inputs[@]}" --extra fast -c requirements/test.lock "${UV_TARGET[@]}" \
  -o requirements/runtime.lock
# Every direct dependency exactly at its lower bound (a resolver's "lowest-direct" alone may
# pick a higher one to suit a newer transitive dependency); the others as new as fits.
floors=$(mktemp)
trap 'rm -f "$floors"' EXIT
"${PYTHON:-python3}" - "${tests[@]}" > "$floors" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(project["dependencies"])
for extra in ("fast", "test"):
    reqs += project["optional-dependencies"][extra]
for path in sys.argv[2:]:
    reqs += [r for r in open(path) if r.strip() and not r.startswith("#")]
for req in reqs:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*(?:>=|==)\s*([^,;\s]+)", req)
    if m is None:
        sys.exit(f"lock.sh: no lower bound in {req.strip()!r}: every dependency needs one")
    print(f"{m[1]}=={m[2]}")
PY
"$UV" pip compile "${tests[@]}" --extra test --extra fast --resolution lowest-direct \
  -c "$floors" "${UV_TARGET[@]}" "$@" -o requirements/lowest.lock
