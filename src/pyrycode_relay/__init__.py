"""pyrycode-relay: a wire-compatible WebSocket relay between pyrycode binaries and phones.

This package root owns only what identifies the build: the version string and the source
revision the wheel was built from (written by hatch_build.py); everything else lives in the
sub-packages (core, transport, endpoints, ops, ...).
"""

from importlib import resources
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyrycode-relay")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "dev"


def source_revision() -> str | None:
    """The source revision of this build; None when unknown (an editable install, or a
    wheel built without git and without SOURCE_REVISION)."""
    try:
        text = (resources.files(__name__) / "_revision").read_text(encoding="utf-8")
    except OSError:
        return None
    return text.strip() or None
