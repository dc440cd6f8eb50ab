"""The Unix socket between a relay and the successor it started: messages and descriptors.

Owns: the message sequence of one handover and its framing (one SOCK_SEQPACKET message per
step, so a message's descriptors arrive with it): the successor says `hello` when it can
receive; the old process sends `state` with the blob's memfd and the listening sockets, then
`conns` messages of at most 253 descriptors each (the kernel's SCM_RIGHTS limit); the
successor answers `ack`, or `nak` with a reason; the old process then exits, which the
successor sees as the end of the socket. Every blocking step has a deadline.
Must never: be inherited by any other process (the end of the socket is how the successor
learns that the old process is gone), or carry anything but the handover.
"""

from __future__ import annotations

import os
import socket
import time

from pyrycode_relay.core.handover_state import HandoverError

ENV_HANDOVER_FD = "PYRYCODE_HANDOVER_FD"  # set only by a relay for the successor it starts
MAX_FDS = 253  # SCM_MAX_FD: descriptors per message
_MSG_BYTES = 4096

HELLO = b"hello"
ACK = b"ack"
NAK = b"nak "
STATE = b"state "
CONNS = b"conns"


def pair() -> tuple[socket.socket, socket.socket]:
    """(ours, the successor's): ours is close-on-exec, the successor's is passed to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return ours, theirs


class Channel:
    """One end of the handover socket, used blocking with deadlines (the old process holds
    its event loop while it hands over; the successor serves nothing yet)."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer  # "successor" or "predecessor", for the failure's reason

    def close(self) -> None:
        self.sock.close()

    def _arm(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandoverError("timed out")
        self.sock.settimeout(left)

    def send(self, data: bytes, fds: list[int], deadline: float) -> None:
        self._arm(deadline)
        try:
            socket.send_fds(self.sock, [data], fds)
        except TimeoutError:
            raise HandoverError("timed out") from None
        except OSError as exc:
            raise HandoverError(f"handover socket: {exc.strerror or type(exc).__name__}") from None

    def recv(self, deadline: float, maxfds: int = 0) -> tuple[bytes, list[int]]:
        """One message and its descriptors; HandoverError at the deadline or the end."""
        self._arm(deadline)
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, _MSG_BYTES, maxfds)
        except TimeoutError:
            raise HandoverError("timed out") from None
        except OSError as exc:
            raise HandoverError(f"handover socket: {exc.strerror or type(exc).__name__}") from None
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise HandoverError("descriptors truncated")
        if not data and not fds:
            raise HandoverError(f"{self.peer} exited")
        return data, fds

    def wait_closed(self, deadline: float) -> None:
        """Until the other end is closed (the old process exited)."""
        self._arm(deadline)
        try:
            while self.sock.recv(_MSG_BYTES):
                pass
        except TimeoutError:
            raise HandoverError("timed out") from None


def memfd_with(data: bytes) -> int:
    """A memory file holding `data`, for the successor to read."""
    fd = os.memfd_create("pyrycode-relay-handover", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return fd


def read_fd(fd: int) -> bytes:
    """The whole content of a file received as a descriptor (closes it)."""
    try:
        size = os.fstat(fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
