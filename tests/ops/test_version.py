"""`--version` names the source revision of a wheel: built here with the locked hatchling
(hatch_build.py), then run from the wheel itself in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pyrycode_relay import __version__, source_revision

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(out: Path, env: dict[str, str]) -> Path:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = out.glob("*.whl")
    return wheel


def version_from(wheel: Path) -> str:
    code = "import sys; from pyrycode_relay.cli import main; sys.exit(main(['--version']))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(wheel)  # ahead of the editable install
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wheel_built_with_source_revision_prints_it(tmp_path: Path) -> None:
    env = {**os.environ, "SOURCE_REVISION": "0123456789ab"}
    wheel = build_wheel(tmp_path, env)
    assert version_from(wheel) == f"{__version__} (revision 0123456789ab)\n"


def test_wheel_built_from_a_git_checkout_names_its_head(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_REVISION"}
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wheel = build_wheel(tmp_path, env)
    printed = version_from(wheel)
    assert printed.startswith(f"{__version__} (revision {head}"), printed


def test_editable_install_has_no_revision() -> None:
    # The test venvs install the project editable: its source moves under it.
    assert source_revision() is None
