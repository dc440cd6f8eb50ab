# Sourced by scripts/lock.sh and scripts/test-deps.sh: UV is the uv pinned in
# requirements/uv.lock, installed by scripts/install.sh into .venv-uv.
bash scripts/install.sh .venv-uv requirements/uv.lock --no-project
UV=.venv-uv/bin/uv
# What every lock is resolved for: the relay's Python on x86_64 Linux. The hashes of every file
# of each pinned version are kept, so another architecture installs a lock where each package
# has a wheel for it (not checked here).
UV_TARGET=(--python-version 3.11 --python-platform linux --generate-hashes --quiet)
export UV_CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"
