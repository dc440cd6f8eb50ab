"""The successor's side of a live handover: receive, refuse or acknowledge, wait.

Owns: the handover socket named by `PYRYCODE_HANDOVER_FD` (taken out of the environment, so
a later upgrade starts its own), receiving the blob and the descriptors, the answer, and
waiting for the old process to be gone before anything is served; and the test-only flag
`--handover-test` (`fail-start`, `no-ack`, `format=N`), which makes a successor fail in each
way the old process must survive. Only a successor acts on it (it gets its predecessor's
command line).
Must never: touch a received socket before the old process is gone (`wait_gone`): until
then the old process may still be serving every one of them.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import MutableMapping

from pyrycode_relay.handover.channel import (
    ACK,
    CONNS,
    ENV_HANDOVER_FD,
    HELLO,
    MAX_FDS,
    NAK,
    STATE,
    Channel,
    read_fd,
)
from pyrycode_relay.handover.state import FORMAT_VERSION, HandoverError


class Received:
    """What the old process sent: the blob's bytes, the listeners, the connections."""

    def __init__(
        self, blob: bytes, listeners: list[socket.socket], conns: list[socket.socket]
    ) -> None:
        self.blob = blob
        self.listeners = listeners
        self.conns = conns


class Predecessor:
    """The old process, seen from its successor."""

    def __init__(self, sock: socket.socket, test: str) -> None:
        self.channel = Channel(sock, "predecessor")
        self.test = test  # --handover-test ("" normally)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str], test: str) -> Predecessor | None:
        value = environ.pop(ENV_HANDOVER_FD, None)
        if value is None:
            return None
        try:
            sock = socket.socket(fileno=int(value))
        except (ValueError, OSError):
            return None
        return cls(sock, test)

    @property
    def fails_start(self) -> bool:
        return self.test == "fail-start"

    @property
    def expected_format(self) -> int:
        if self.test.startswith("format="):
            with contextlib.suppress(ValueError):
                return int(self.test.partition("=")[2])
        return FORMAT_VERSION

    def hello(self, deadline: float) -> None:
        self.channel.send(HELLO, [], deadline)

    def receive(self, deadline: float) -> Received:
        fds: list[int] = []
        try:
            data, got = self.channel.recv(deadline, MAX_FDS)
            fds.extend(got)
            if not data.startswith(STATE) or not got:
                raise HandoverError("handover socket: no state")
            count = int(data[len(STATE) :])
            blob = read_fd(fds.pop(0))
            listeners = list(fds)
            fds.clear()
            conns: list[int] = []
            while len(conns) < count:
                data, got = self.channel.recv(deadline, MAX_FDS)
                conns.extend(got)
                if data != CONNS:
                    raise HandoverError("handover socket: unexpected message")
            return Received(
                blob,
                [socket.socket(fileno=fd) for fd in listeners],
                [socket.socket(fileno=fd) for fd in conns],
            )
        except (HandoverError, ValueError):
            for fd in fds:
                os.close(fd)
            raise

    def refuse(self, reason: str, deadline: float) -> None:
        with contextlib.suppress(HandoverError):
            self.channel.send(NAK + reason.encode("ascii", "replace"), [], deadline)

    def ack(self, deadline: float) -> None:
        self.channel.send(ACK, [], deadline)

    def wait_gone(self, deadline: float) -> None:
        """Until the old process has exited (its end of the socket closes with it)."""
        self.channel.wait_closed(deadline)
        self.channel.close()
