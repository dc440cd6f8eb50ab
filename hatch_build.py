"""Build hook: record the source revision a wheel is built from, for `--version`.

Writes `pyrycode_relay/_revision` (one line) into the wheel: `SOURCE_REVISION` from the
environment when set (a container build has no .git), else `git rev-parse --short=12 HEAD`
with `+dirty` for uncommitted changes to tracked files, else nothing (`--version` then
prints the version alone, and build_info's revision label is empty). Editable installs get
no file: their source moves under them.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _git(root: str, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_revision(root: str) -> str | None:
    given = os.environ.get("SOURCE_REVISION", "").strip()
    if given:
        return given
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    head = _git(root, "rev-parse", "--short=12", "HEAD")
    if not head:
        return None
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


class RevisionHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        revision = source_revision(self.root)
        if revision is None:
            return
        out = tempfile.NamedTemporaryFile("w", suffix=".revision", delete=False)  # noqa: SIM115
        with out:
            out.write(revision + "\n")
        self._written = out.name
        build_data["force_include"][out.name] = "pyrycode_relay/_revision"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        written = getattr(self, "_written", None)
        if written is not None:
            os.unlink(written)
