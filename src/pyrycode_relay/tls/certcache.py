"""The certificate cache directory's permission policy (reference §10, boot step 14).

Owns: creating the cache directory 0700, accepting a private one, tightening a
group/other-readable directory the relay itself owns (Fly volumes mount 0755), and
refusing anything else — another owner's readable directory, an unknown owner
(non-Linux), or a path that is not a directory. The TLS front end makes a refusal exit 1
(a runtime condition of the host, not a configuration error), as in the reference.
Must never: log (the caller logs the returned outcome), follow the policy loosely on
failure (an error while checking is a refusal), or touch files inside the directory.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Final, Literal

PRIVATE_MODE: Final = 0o700
REASON_INSECURE: Final = "relay: cert cache dir has insecure permissions (must be 0700)"
REASON_NOT_DIR: Final = "relay: cert cache path exists and is not a directory"


class CertCacheRefusal(Exception):
    """The cache directory cannot be used, for this one-line reason."""


@dataclass(frozen=True, slots=True)
class Tightened:
    """The directory was ours and too open; it is now 0700. Modes as Go's %#o prints."""

    path: str
    from_mode: str
    to_mode: str = "0700"


@dataclass(frozen=True, slots=True)
class CacheAction:
    """What `prepare_cert_cache` will do with the directory; `mode` is the current one."""

    action: Literal["create", "use", "tighten"]
    mode: str = ""


def inspect_cert_cache(path: str, *, euid: int, platform: str) -> CacheAction:
    """What `prepare_cert_cache` would do, without doing it; raises CertCacheRefusal for
    what it would refuse. Read-only, so `--check-config` can ask too."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):  # makedirs creates every missing level
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CertCacheRefusal(
                "relay: creating cert cache dir: its parent is not writable"
            ) from None
        return CacheAction("create")
    except OSError as exc:
        raise CertCacheRefusal(f"relay: checking cert cache dir: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CertCacheRefusal(REASON_NOT_DIR)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 == 0:
        return CacheAction("use", f"0{mode:o}")
    # Ownership is only trusted where st_uid means what it says for our process (Linux,
    # like the reference); elsewhere an open directory is refused outright.
    if platform != "linux" or st.st_uid != euid:
        raise CertCacheRefusal(REASON_INSECURE)
    return CacheAction("tighten", f"0{mode:o}")


def prepare_cert_cache(path: str, *, euid: int, platform: str) -> Tightened | None:
    """Make `path` a private directory or raise CertCacheRefusal; returns what was
    tightened (for the `tightened cert cache dir perms` log line), None otherwise."""
    found = inspect_cert_cache(path, euid=euid, platform=platform)
    if found.action == "create":
        try:
            os.makedirs(path, mode=PRIVATE_MODE)
            # makedirs is subject to the umask only in the restrictive direction, but an
            # explicit chmod states the policy rather than relying on that.
            os.chmod(path, PRIVATE_MODE)
        except OSError as exc:
            raise CertCacheRefusal(f"relay: creating cert cache dir: {exc.strerror}") from None
        return None
    if found.action == "use":
        return None
    try:
        os.chmod(path, PRIVATE_MODE)
    except OSError as exc:
        raise CertCacheRefusal(f"relay: tightening cert cache dir: {exc.strerror}") from None
    return Tightened(path, found.mode)
