"""A connection's exported state is exact, over a real socket on the real event loop.

The relay writes WebSocket frames to a peer that reads slowly or not at all, so the transport
holds unsent bytes; with the loop held (the test's own synchronous code), what the kernel has
for the peer plus what the export says is unsent must be every byte written, in order. And a
frame received in pieces is carried as its raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from pyrycode_relay.transport.connection import Connection, ConnSettings
from pyrycode_relay.transport.http import RequestHead

SETTINGS = ConnSettings(
    handshake_timeout=5.0,
    heartbeat_interval=30.0,
    heartbeat_timeout=30.0,
    message_read_timeout=30.0,
    write_timeout=30.0,
    max_message_bytes=1 << 20,
)


class Handler:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def on_message(self, data: bytes) -> None:
        self.messages.append(data)

    def on_writable(self) -> None:
        pass

    def on_write_timeout(self) -> None:
        pass

    def on_heartbeat_timeout(self) -> None:
        pass

    def on_closed(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class NoRouter:
    def route(self, conn: Connection, head: RequestHead) -> None:
        raise AssertionError("no request head in these tests")


async def websocket(write_high: int) -> tuple[Connection, socket.socket, Handler]:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    conn = Connection(NoRouter(), SETTINGS, set())
    await loop.connect_accepted_socket(lambda: conn, ours)
    handler = Handler()
    conn.accept_websocket(b"", handler, write_high, lambda: None)
    return conn, peer, handler


def read_available(peer: socket.socket, limit: int = 1 << 30) -> bytes:
    """What the kernel has for `peer` now, up to `limit` bytes."""
    chunks = []
    while limit > 0:
        try:
            chunk = peer.recv(min(limit, 1 << 16))
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def server_frame(payload: bytes) -> bytes:
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


Runner = Callable[[Coroutine[Any, Any, None]], None]
RUNNERS: list[Runner] = [asyncio.run]
with contextlib.suppress(ImportError):
    import uvloop  # both loops the relay runs on: their transports differ

    RUNNERS.append(uvloop.run)


@contextlib.asynccontextmanager
async def opened(write_high: int) -> AsyncIterator[tuple[Connection, socket.socket, Handler]]:
    conn, peer, handler = await websocket(write_high)
    try:
        yield conn, peer, handler
    finally:
        conn.abort()
        peer.close()
        await asyncio.sleep(0)


async def unsent_case(write_high: int) -> None:
    async with opened(write_high) as (conn, peer, _):
        written = b""
        got = b""
        for round_ in range(6):
            for n in range(40):
                payload = b'{"r":%d,"n":%d,"pad":"%s"}' % (round_, n, b"x" * 3000)
                assert conn.send_text(payload)
                written += server_frame(payload)
            await asyncio.sleep(0.01)  # batches go to the transport, which writes what it can
            got += read_available(peer, 20000 * (round_ % 3))  # a slow reader, sometimes
            await asyncio.sleep(0.01)
        assert conn.transport is not None and conn.transport.get_write_buffer_size() > 0
        state = conn.export_ws()  # the loop is held from here on: nothing more is written
        kernel = read_available(peer)
        assert written.startswith(got)
        seen = len(got) + len(kernel)
        assert kernel == written[len(got) : seen]
        assert state.unsent == written[seen:]


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("write_high", [0, 64 * 1024])
def test_unsent_bytes_are_exactly_what_the_peer_has_not_got(write_high: int, run: Runner) -> None:
    run(unsent_case(write_high))


async def pieces_case() -> None:
    async with opened(0) as (conn, _, handler):
        whole = Frame(Opcode.TEXT, b'{"whole":1}').serialize(mask=True)
        piece = Frame(Opcode.TEXT, b'{"piece":"' + b"y" * 300 + b'"}').serialize(mask=True)
        conn.data_received(whole + piece[:7])
        conn.data_received(piece[7:100])
        assert handler.messages == [b'{"whole":1}']
        state = conn.export_ws()
        assert state.rx_tail == piece[:100]
        assert state.fragments is None
        # A fragmented message: its frames so far are carried as the payload.
        conn.data_received(piece[100:])
        first = Frame(Opcode.TEXT, b'{"frag":', fin=False).serialize(mask=True)
        conn.data_received(first)
        state = conn.export_ws()
        assert state.fragments == b'{"frag":' and state.fragments_text
        assert state.rx_tail == b""


@pytest.mark.parametrize("run", RUNNERS)
def test_a_frame_received_in_pieces_is_carried_raw(run: Runner) -> None:
    run(pieces_case())
