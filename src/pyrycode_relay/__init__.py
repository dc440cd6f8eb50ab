"""pyrycode-relay: a wire-compatible WebSocket relay between pyrycode binaries and phones.

This package root owns only the version string; everything else lives in the
sub-packages (core, transport, endpoints, ops).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyrycode-relay")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "dev"
