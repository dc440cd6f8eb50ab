# Sourced by scripts/lock.sh and scripts/test-deps.sh: sets UV to the uv pinned in
# requirements/uv.lock, installed (once) into .venv-uv by scripts/install.sh's own rules.
uv_venv=.venv-uv
uv_want="$(sha256sum requirements/uv.lock | cut -d' ' -f1)"
if [ ! -x "$uv_venv/bin/uv" ] || [ "$(cat "$uv_venv/.installed-from" 2>/dev/null)" != "$uv_want" ]; then
  rm -rf "$uv_venv"
  "${PYTHON:-python3}" -m venv "$uv_venv"
  "$uv_venv/bin/python" -m pip --disable-pip-version-check -q install --require-hashes \
    --only-binary=:all: -r requirements/uv.lock
  echo "$uv_want" > "$uv_venv/.installed-from"
fi
UV="$uv_venv/bin/uv"
# What every lock is resolved for: the relay's Python on Linux. Hashes cover every file of
# each pinned version, so a lock installs on any Linux architecture.
UV_TARGET=(--python-version 3.11 --python-platform linux --generate-hashes --quiet)
export UV_CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"
