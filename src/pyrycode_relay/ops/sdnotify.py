"""The systemd notify protocol (sd_notify(3)): tell the service manager READY, RELOADING,
STOPPING and a STATUS line, over the datagram socket named by `NOTIFY_SOCKET`.

Owns: parsing the socket address (a path, or `@name` for the abstract namespace), sending
one datagram per state change, and reporting a failed send once. The protocol is a few
lines of text on a Unix socket, so no library is needed.
Must never: block (the socket is non-blocking and a datagram is all or nothing), raise into
its caller, or log the socket's address (an environment value).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping

ENV_NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify_address(value: str) -> str | bytes | None:
    """The socket address for `NOTIFY_SOCKET`'s value; None when unset or not a Unix
    socket (systemd also speaks vsock, which a relay has no use for)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    return None


class SystemdNotifier:
    """One process's notifications; a no-op without `NOTIFY_SOCKET`.

    Concurrency: called from the event loop's thread; each call is one non-blocking send.
    `on_error` (the relay's logger) hears about the first failed send only.
    """

    def __init__(
        self, environ: Mapping[str, str], on_error: Callable[[str], None] | None = None
    ) -> None:
        self._address = notify_address(environ.get(ENV_NOTIFY_SOCKET, ""))
        self._on_error = on_error
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (Type=notify-reload) tell this reload from an older one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=draining")

    def mainpid(self, pid: int) -> None:
        """The service's main process is now `pid` (a live handover's successor)."""
        self._send(f"MAINPID={pid}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def _send(self, message: str) -> None:
        address = self._address
        if address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), address)
        except OSError as exc:
            if not self._failed and self._on_error is not None:
                self._on_error(exc.strerror or type(exc).__name__)
            self._failed = True
