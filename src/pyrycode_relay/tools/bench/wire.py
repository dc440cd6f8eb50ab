"""The bench's WebSocket client: one asyncio Protocol per connection, raw RFC 6455 frames.

Owns: the upgrade request, masking client frames, parsing the relay's (unmasked) frames,
answering pings, and batching every frame queued during one callback into one write.
Must never: connect anywhere but loopback (the caller checks), create a task per frame,
or be used by the relay itself (the relay's transport is transport/connection.py).

Why hand-rolled frames instead of websockets' client: the client has to out-run the relay
on one core. The server→client direction is unmasked and never fragmented by the relay, so
parsing is a few slices; masking uses websockets' C `apply_mask`. A per-connection random
mask key is used for every frame of that connection — RFC 6455 asks for a fresh key per
frame against proxy cache poisoning, which does not apply to a loopback benchmark, and the
relay unmasks whatever key it is given.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable

from websockets.utils import apply_mask

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def upgrade_request(host: str, path: str, headers: list[tuple[str, str]]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def encode_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One masked, final client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


class WsClient(asyncio.Protocol):
    """A WebSocket client connection. `on_text(payload)` gets every text message;
    `on_close(code)` runs once when the connection ends (code None: no close frame)."""

    def __init__(
        self,
        request: bytes,
        on_text: Callable[[bytes], None],
        on_close: Callable[[int | None], None],
    ) -> None:
        self._request = request
        self.on_text = on_text
        self.on_close = on_close
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._upgraded = False
        self._out: list[bytes] = []
        self._mask = os.urandom(4)
        self.closed = False
        self.close_code: int | None = None
        self.pings_answered = 0
        self.protocol_errors = 0

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                if not self.ready.done():
                    self.ready.set_result(False)
                self._end(None)
                return
            self._upgraded = True
            if not self.ready.done():
                self.ready.set_result(True)
            buf = buf[end + 4 :]
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = pos + 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = pos + 10
            if b1 & 0x80 or not b0 & 0x80:
                self.protocol_errors += 1  # the relay never masks nor fragments
            end = head + n
            if end > size:
                break
            payload = buf[head:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == OP_TEXT:
                self.on_text(payload)
            elif opcode == OP_PING:
                self.pings_answered += 1
                self._out.append(encode_frame(OP_PONG, payload, self._mask))
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._out.append(encode_frame(OP_CLOSE, payload[:2], self._mask))
                self.flush()
                self._end(code)
                return
            elif opcode != OP_PONG:
                self.protocol_errors += 1
        self._buf = buf[pos:] if pos < size else b""
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
        self._end(None)

    # -- sending --------------------------------------------------------------------

    def queue_text(self, payload: bytes) -> None:
        """Queue a text frame; it is written with the others at the next `flush()`."""
        self._out.append(encode_frame(OP_TEXT, payload, self._mask))

    def flush(self) -> None:
        out = self._out
        if out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        self._out = []

    def close(self, code: int = 1000) -> None:
        if not self.closed and self.transport is not None:
            self._out.append(encode_frame(OP_CLOSE, code.to_bytes(2, "big"), self._mask))
            self.flush()
            self.transport.close()
        self._end(code)

    def _end(self, code: int | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        if self.transport is not None:
            self.transport.close()
        self.on_close(code)


async def connect(
    host: str,
    *,
    port: int,
    path: str,
    headers: list[tuple[str, str]],
    on_text: Callable[[bytes], None],
    on_close: Callable[[int | None], None],
    deadline: float = 10.0,
) -> WsClient | None:
    """Open one WebSocket; None if the upgrade was refused or timed out."""
    loop = asyncio.get_running_loop()
    request = upgrade_request(f"{host}:{port}", path, headers)
    try:
        async with asyncio.timeout(deadline):
            _, proto = await loop.create_connection(
                lambda: WsClient(request, on_text, on_close), host, port
            )
            ok = await proto.ready
    except (OSError, TimeoutError):
        return None
    return proto if ok else None
