"""The HTTPS listener with `--https-proxy-protocol`: PROXY v2 header, then TLS, then HTTP.

Owns: the listening sockets and their accept loops; per accepted socket, the peer
allowlist (`--proxy-protocol-allow`, checked against the socket peer before a byte is
read), reading the PROXY header within --handshake-timeout, and handing the socket to
asyncio's TLS server side (`connect_accepted_socket(ssl=...)`) with the header's source
address as the client address.

Why the socket is read by hand instead of through an asyncio transport: a transport
reads whatever the kernel has, so a header and ClientHello that arrive in one segment
would put ClientHello bytes into our buffer where the TLS layer can no longer see them.
Reading with `recv(n)` where `n` is exactly what the header still lacks never takes a
byte beyond the header; the ClientHello stays in the kernel for the TLS transport.
Each socket waits for readability through `loop.add_reader`, so a silent peer holds
only its own socket (and its own deadline timer) and never delays another connection.

Must never: write a byte to a refused connection (it is closed unserved), fall back to
the socket peer's address when a header is missing, or log (a refused or late PROXY
connection is not logged, like the reference's listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Sequence
from functools import partial

from pyrycode_relay.core.addresses import Network
from pyrycode_relay.tls.proxy import ProxyError, needed, parse_proxy_v2, peer_allowed
from pyrycode_relay.transport.connection import Connection

_ACCEPT_ERROR_PAUSE = 0.1  # EMFILE and friends: back off briefly instead of spinning


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for `host` ("" = every interface), like loop.create_server."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(4096)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _HeaderRead:
    """One accepted socket until its PROXY header is complete (or refused)."""

    __slots__ = ("buf", "listener", "sock", "timer")

    def __init__(self, listener: ProxyListener, sock: socket.socket) -> None:
        self.listener = listener
        self.sock = sock
        self.buf = b""
        loop = listener.loop
        self.timer = loop.call_later(listener.handshake_timeout, self.fail)
        loop.add_reader(sock, self.readable)

    def readable(self) -> None:
        try:
            chunk = self.sock.recv(needed(self.buf) - len(self.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.fail()
            return
        if not chunk:  # the peer closed before a complete header
            self.fail()
            return
        self.buf += chunk
        try:
            header = parse_proxy_v2(self.buf)
        except ProxyError:
            self.fail()
            return
        if header is None:
            return
        self._stop()
        self.listener.header_read(self.sock, header.source_host)

    def _stop(self) -> None:
        self.timer.cancel()
        self.listener.loop.remove_reader(self.sock)
        self.listener.reading.discard(self)

    def fail(self) -> None:
        """Close unserved: nothing was ever written to this socket."""
        self._stop()
        self.sock.close()


def _close_after(sock: socket.socket, _task: asyncio.Task[None]) -> None:
    sock.close()


class ProxyListener:
    """Accepts, reads PROXY headers and starts TLS; `close()` stops it (drain)."""

    def __init__(
        self,
        sockets: list[socket.socket],
        ssl_context: ssl.SSLContext,
        make_connection: Callable[[str], Connection],
        allow: Sequence[Network],
        handshake_timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sockets = sockets
        self.ssl_context = ssl_context
        self.make_connection = make_connection
        self.allow = list(allow)
        self.handshake_timeout = handshake_timeout
        self.reading: set[_HeaderRead] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting = [self.loop.create_task(self._accept(s)) for s in sockets]

    async def _accept(self, listening: socket.socket) -> None:
        while True:
            try:
                sock, addr = await self.loop.sock_accept(listening)
            except OSError:
                await asyncio.sleep(_ACCEPT_ERROR_PAUSE)
                continue
            sock.setblocking(False)
            if not peer_allowed(str(addr[0]), self.allow):
                sock.close()
                continue
            self.reading.add(_HeaderRead(self, sock))

    def header_read(self, sock: socket.socket, client_host: str) -> None:
        task = self.loop.create_task(self._start_tls(sock, client_host))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _start_tls(self, sock: socket.socket, client_host: str) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: self.make_connection(client_host),
                sock,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError):
            sock.close()  # handshake failed or timed out; asyncio may have closed it already
        except asyncio.CancelledError:
            sock.close()
            raise

    def close(self) -> None:
        for task, sock in zip(self._accepting, self.sockets, strict=True):
            task.cancel()
            with contextlib.suppress(OSError):
                self.loop.remove_reader(sock)
            # Closed once the accept is cancelled: uvloop's cancelled sock_accept still
            # unregisters the descriptor then, which fails on a closed socket. (The process
            # goes on after this when a live handover passed the socket on.)
            task.add_done_callback(partial(_close_after, sock))
        for pending in list(self.reading):
            pending.fail()
        for task in list(self._handshakes):
            task.cancel()
