"""The successor's side of a live handover: receive, refuse or acknowledge, wait.

Owns: the handover socket named by `PYRYCODE_HANDOVER_FD` (taken out of the environment, so
a later upgrade starts its own), receiving the blob and the descriptors, the answer,
waiting for the old process to be gone before anything is served, and the order in which
the successor then serves (`take_over`: connections, then listeners); and the test-only flag
`--handover-test` (`fail-start`, `no-ack`, `format=N`), which makes a successor fail in each
way the old process must survive. Only a successor acts on it (it gets its predecessor's
command line).
Must never: touch a received socket before the old process is gone (`wait_gone`): until
then the old process may still be serving every one of them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, TypeVar

from pyrycode_relay.core.handover_state import FORMAT_VERSION, HandoverError
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
from pyrycode_relay.ops.refusal import ExitCode, Refusal

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.relay import Relay
    from pyrycode_relay.transport.connection import Connection, ConnSettings, Router

MSG_HANDOVER_REFUSED = "handover refused; exiting"
MSG_HANDOVER_TEST = "handover test flag: failing at start"
T = TypeVar("T")


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


async def take_over(
    predecessor: Predecessor,
    relay: Relay,
    live: set[Connection],
    *,
    routers: Mapping[str, Router],
    settings: ConnSettings,
    kinds: set[str],
    within: float,
    open_listeners: Callable[[Mapping[str, list[socket.socket]]], Awaitable[T]],
) -> tuple[T, int, float]:
    """Receive everything, rebuild the relay's state, acknowledge, wait for the old process
    to be gone, then serve: every connection first, then the listeners (`open_listeners`
    over the adopted sockets), so a client that connects meanwhile waits in the backlog
    and finds the registry, grace windows included, whole. Returns what `open_listeners`
    made, the number of connections and the export time (time.monotonic()). Raises
    Refusal when the handover is refused (the old process serves on) or the old process
    did not go. Each step waits at most `within` seconds."""
    from pyrycode_relay.core import handover_state as state
    from pyrycode_relay.handover import snapshot

    if predecessor.fails_start:
        raise Refusal(MSG_HANDOVER_TEST, {"reason": "fail-start"}, exit_code=ExitCode.RUNTIME)
    deadline = time.monotonic() + within
    gc.disable()  # until every connection serves again (a collection over them is slow)
    try:
        try:
            predecessor.hello(deadline)
            received = predecessor.receive(time.monotonic() + within)
            deadline = time.monotonic() + within
            blob = state.decode(received.blob, predecessor.expected_format)
            if len(blob.listeners) != len(received.listeners):
                raise HandoverError("listener count does not match the state")
            if set(blob.listeners) != kinds:
                raise HandoverError("the listeners differ from this configuration's")
            restored = snapshot.restore(
                relay, blob, received.conns, routers=routers, settings=settings, live=live
            )
        except Exception as exc:  # whatever failed, the old process serves on
            reason = str(exc) if isinstance(exc, HandoverError) else type(exc).__name__
            predecessor.refuse(reason, deadline)
            raise Refusal(
                MSG_HANDOVER_REFUSED, {"reason": reason}, exit_code=ExitCode.RUNTIME
            ) from None
        try:
            if predecessor.test == "no-ack":
                predecessor.wait_gone(time.monotonic() + 3600)  # until the old one kills us
            predecessor.ack(deadline)
            if blob.drain:
                # Listeners only: the old process stopped accepting when we acknowledged,
                # and drains its own connections (TLS sessions cannot leave it).
                predecessor.channel.close()
            else:
                predecessor.wait_gone(deadline)
        except HandoverError as exc:
            # Acknowledged, but the old process did not go: it serves on; so must not we.
            raise Refusal(
                MSG_HANDOVER_REFUSED, {"reason": str(exc)}, exit_code=ExitCode.RUNTIME
            ) from None
        # The old process is gone (or, draining, no longer accepts): from here on, we serve.
        adopted: dict[str, list[socket.socket]] = {}
        for kind, sock in zip(blob.listeners, received.listeners, strict=True):
            adopted.setdefault(kind, []).append(sock)
        await restored.adopt()
        restored.start()
        opened = await open_listeners(adopted)
    finally:
        gc.enable()
    return opened, len(restored.conns), blob.exported_at
