#!/usr/bin/env bash
# The test command (README; CI's .ci/run): every check, on the locked versions and then on
# the lowest versions pyproject.toml's ranges allow. Both sets are committed locks, so the
# result does not depend on the day it runs. Arguments go to pytest.
# One set only, or the newest versions the index serves: scripts/test-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh locked "$@"
bash scripts/test-deps.sh lowest "$@"
