#!/usr/bin/env bash
# Writes the committed locks in requirements/ (uv pip compile, with hashes):
#   test.lock     what the tests install: the relay, its fast and test extras, and what an
#                 editable install builds with (build.in, editable.in)
#   runtime.lock  what the README, docs/operations.md and the Dockerfile install: the relay and
#                 its fast extra, at the versions test.lock has
#   build.lock    what builds the relay's wheel for them (build.in), at test.lock's versions
#   lowest.lock   the test set with every direct dependency exactly at the lower bound of its
#                 range in pyproject.toml (floors.txt, written here too)
#   uv.lock       uv itself, the tool that writes these
#
#   bash scripts/lock.sh             keep each locked version that still fits the ranges
#   bash scripts/lock.sh --upgrade   move to the newest versions the index serves
#
# Then run `bash scripts/test.sh` and commit the locks with what made them pass.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/uv.sh
r=requirements
"$UV" pip compile $r/uv.in "${UV_TARGET[@]}" "$@" -o $r/uv.lock
tests=(pyproject.toml $r/build.in $r/editable.in)
"$UV" pip compile "${tests[@]}" --extra test --extra fast "${UV_TARGET[@]}" "$@" -o $r/test.lock
"$UV" pip compile pyproject.toml --extra fast -c $r/test.lock "${UV_TARGET[@]}" -o $r/runtime.lock
"$UV" pip compile $r/build.in -c $r/test.lock "${UV_TARGET[@]}" -o $r/build.lock
# A resolver's "lowest-direct" alone may pick a higher version of a direct dependency to suit
# a newer transitive one; these constraints hold each at its floor. The others are as new as fits.
"${PYTHON:-python3}" - "${tests[@]}" > $r/floors.txt <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(project["dependencies"])
for extra in ("fast", "test"):
    reqs += project["optional-dependencies"][extra]
for path in sys.argv[2:]:
    reqs += [r for r in open(path) if r.strip() and not r.startswith("#")]
print("# Written by scripts/lock.sh: every direct dependency at the lower bound of its range.")
for req in reqs:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*(?:>=|==)\s*([^,;\s]+)", req)
    if m is None:
        sys.exit(f"lock.sh: no lower bound in {req.strip()!r}: every dependency needs one")
    print(f"{m[1]}=={m[2]}")
PY
"$UV" pip compile "${tests[@]}" --extra test --extra fast --resolution lowest-direct \
  -c $r/floors.txt "${UV_TARGET[@]}" "$@" -o $r/lowest.lock
