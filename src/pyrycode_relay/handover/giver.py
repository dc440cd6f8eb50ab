"""The old process's side of a live handover: start the successor, hand everything over.

Owns: starting the successor from the installed code with this process's arguments and
environment (plus the handover socket), waiting for it to be ready, exporting the relay's
state (`give`, with the caller's event loop held and garbage collection off), sending the
blob and every descriptor, and reading its answer; and killing it on any failure, so that
exactly one process serves.
Must never: change a connection's state (the caller's event loop is held while
`hand_over` runs, and on a failure the caller simply goes on serving), or leave a
successor running when the handover did not complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from pyrycode_relay.core.handover_state import HandoverError
from pyrycode_relay.handover.channel import (
    ACK,
    CONNS,
    ENV_HANDOVER_FD,
    HELLO,
    MAX_FDS,
    NAK,
    STATE,
    Channel,
    memfd_with,
    pair,
)
from pyrycode_relay.handover.init import ENV_INIT, relay_argv

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.relay import Relay
    from pyrycode_relay.transport.connection import Connection, Listener


def blocked_by_init(*, was_successor: bool) -> str:
    """Why a successor would not outlive this process ("" when it would): as the first
    process of a container (pid 1), or as the process a container's init started (tini,
    docker's --init, dumb-init: pid 1 but not systemd), this process's exit ends the
    container. Under systemd, a shell, a supervisor that follows MAINPID, or the relay's own
    init (a relay started as pid 1 stays behind as one, handover/init.py) it does not; nor
    for a successor, which pid 1 only adopted when its predecessor exited."""
    if os.getpid() == 1:
        return "running as pid 1"
    if was_successor or os.getppid() != 1 or os.environ.get(ENV_INIT) == "1":
        return ""  # our own init (handover/init.py) follows the successor
    try:
        with open("/proc/1/comm", encoding="utf-8", errors="replace") as f:
            init = f.read().strip()
    except OSError:
        return ""
    return "" if init == "systemd" else "the parent is a container's init"


class Successor:
    """A started successor, ready to receive. Concurrency: the event loop's thread."""

    def __init__(self, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.proc = proc
        self.channel = channel

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(
        cls, argv: Sequence[str], environ: Mapping[str, str], ready_within: float
    ) -> Successor:
        """Start `python -m pyrycode_relay ARGV` and wait, up to `ready_within` seconds,
        for its hello."""
        ours, theirs = pair()
        env = dict(environ)
        env[ENV_HANDOVER_FD] = str(theirs.fileno())
        try:
            # A fork and an exec (milliseconds); its exit is waited for only after a kill.
            proc = subprocess.Popen(  # noqa: ASYNC220
                relay_argv(argv),
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        except OSError as exc:
            ours.close()
            raise HandoverError(
                f"successor cannot start: {exc.strerror or type(exc).__name__}"
            ) from None
        finally:
            theirs.close()  # the successor's end lives on in the successor only
        successor = cls(proc, Channel(ours, "successor"))
        ours.setblocking(False)
        try:
            async with asyncio.timeout(ready_within):
                hello = await asyncio.get_running_loop().sock_recv(ours, 64)
        except TimeoutError:
            successor.kill()
            raise HandoverError("successor not ready in time") from None
        except OSError:
            hello = b""
        except BaseException:  # cancelled (the process is ending): no orphan successor
            successor.kill()
            raise
        if hello != HELLO:
            successor.kill()
            raise HandoverError("successor exited before it was ready")
        return successor

    def give(
        self,
        relay: Relay,
        listeners: Iterable[tuple[str, Listener]],
        live: Iterable[Connection],
        router_kinds: Mapping[int, str],
        *,
        drain: bool,
        deadline: float,
    ) -> int:
        """Export the relay's state and hand it over with every listener and (unless
        `drain`: listeners only) every live connection; returns how many connections went.
        The caller's event loop is held throughout, so what is exported is what is handed
        over. On any failure the successor is killed and HandoverError says why."""
        from pyrycode_relay.core import handover_state as state
        from pyrycode_relay.handover import snapshot

        # A full collection over 10 000 connections' objects would hold the loop for
        # another 100 ms or more; nothing cyclic worth collecting is made meanwhile.
        gc.disable()
        try:
            listener_fds: list[int] = []
            kinds: list[str] = []
            for kind, server in listeners:
                for sock in getattr(server, "sockets", ()):
                    listener_fds.append(sock.fileno())
                    kinds.append(kind)
            conns, blob = snapshot.export(
                relay, () if drain else live, router_kinds, kinds, drain=drain
            )
            conn_fds = [_socket_fd(conn) for conn in conns]
            self.hand_over(listener_fds, conn_fds, state.encode(blob), deadline)
        except Exception as exc:  # whatever failed, the old process serves on
            self.kill()
            if isinstance(exc, HandoverError):
                raise
            raise HandoverError(type(exc).__name__) from exc
        finally:
            gc.enable()
        return len(conns)

    def hand_over(
        self, listener_fds: list[int], conn_fds: list[int], blob: bytes, deadline: float
    ) -> None:
        """Send the blob, the listeners and the connections; return once the successor has
        acknowledged (it has everything and serves once this process is gone). Blocks, up
        to `deadline` (time.monotonic()); HandoverError on a refusal, its end or the
        deadline."""
        channel = self.channel
        memfd = memfd_with(blob)
        try:
            channel.send(STATE + str(len(conn_fds)).encode(), [memfd, *listener_fds], deadline)
        finally:
            os.close(memfd)
        for start in range(0, len(conn_fds), MAX_FDS):
            channel.send(CONNS, conn_fds[start : start + MAX_FDS], deadline)
        answer, _ = channel.recv(deadline)
        if answer == ACK:
            return
        if answer.startswith(NAK):
            reason = answer[len(NAK) :].decode("ascii", "replace")
            raise HandoverError(f"successor refused: {reason}")
        raise HandoverError("successor answered nonsense")

    def kill(self) -> None:
        """End the successor and wait for it; only then close our end (its end of the
        socket is what would tell a successor that this process is gone)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        self.channel.close()


def _socket_fd(conn: Connection) -> int:
    transport = conn.transport
    assert transport is not None
    fd: int = transport.get_extra_info("socket").fileno()
    return fd
