"""As a container's first process (pid 1), stay behind as a small init so that a live
handover's successor outlives the relay it replaces.

Owns: the command that runs the installed relay (`relay_argv`, a successor's too); starting
the relay as a child (the same arguments and environment, plus a notify socket
of its own and the `PYRYCODE_INIT` marker), forwarding SIGTERM, SIGINT, SIGHUP and SIGUSR2 to
the relay that serves now, following its `MAINPID=` notifications to a successor (a relay
names its successor before it exits), reaping every process that ends (pid 1's duty in a
container), and ending with the exit code of the relay that served last.
Must never: serve, read frames or flags, or stay behind once no relay serves.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Final

from pyrycode_relay.ops.sdnotify import ENV_NOTIFY_SOCKET

ENV_INIT: Final = "PYRYCODE_INIT"  # set by this init for the relays it follows
FORWARDED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
_POLL_SECONDS: Final = 0.2  # how soon an exit is noticed


def relay_argv(argv: Sequence[str]) -> list[str]:
    """The command that runs the installed relay with `argv`: a successor, or the relay
    this init follows."""
    return [sys.executable, "-m", "pyrycode_relay", *argv]


def serve_as_init(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Run the relay `argv` as a child and follow it and its successors; the exit code of
    the last one. Blocks the calling thread (no event loop runs in this process)."""
    name = f"pyrycode-relay-init-{os.getpid()}-{secrets.token_hex(4)}"
    notes = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    # The sender's pid comes with each datagram: only the serving relay may name another.
    notes.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notes.bind(b"\0" + name.encode())
    notes.setblocking(False)
    env = dict(environ)
    env[ENV_NOTIFY_SOCKET] = "@" + name
    env[ENV_INIT] = "1"
    serving = 0  # nobody yet: a signal before the relay starts is kept for it
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if not serving:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):  # ending: its exit is reaped below
            os.kill(serving, signum)

    # Before the child exists: pid 1 ignores a signal it has no handler for.
    for signum in FORWARDED:
        signal.signal(signum, forward)
    serving = subprocess.Popen(  # the relay; its successors are its children, then ours
        relay_argv(argv), env=env, stdin=subprocess.DEVNULL
    ).pid
    for held in pending:
        os.kill(serving, held)
    try:
        while True:
            select.select([notes], [], [], _POLL_SECONDS)
            # Every notification first: a relay names its successor before it exits, so
            # the datagram is queued by the time its exit can be reaped.
            serving = _follow(notes, serving)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return 0  # nothing left to follow
                if pid == 0:
                    break
                if pid == serving:
                    serving = _follow(notes, serving)  # named in the meantime?
                    if pid == serving:
                        return _exit_code(status)
    finally:
        notes.close()


_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _follow(notes: socket.socket, serving: int) -> int:
    """The relay serving after the queued notifications: a `MAINPID=` from the one
    serving names its successor; from any other process it is ignored."""
    while True:
        try:
            data, ancdata, _, _ = notes.recvmsg(4096, socket.CMSG_SPACE(_CRED.size))
        except BlockingIOError:
            return serving
        sender = 0
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = _CRED.unpack(cdata[: _CRED.size])[0]
        if sender != serving:
            continue
        for line in data.decode("utf-8", "replace").split("\n"):
            key, _, value = line.partition("=")
            if key == "MAINPID" and value.isdigit():
                serving = int(value)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell reports it
