"""HTTP/1.1 request heads in, plain responses out — the part before a WebSocket exists.

Owns: reading one request head with h11 (any method, a bounded head size), the WebSocket
handshake's validation and its 101 or error response (websockets' rules, coder/websocket's
status mapping), and serialising the relay's own responses byte-exactly (Go `http.Error`
style bodies, the 404 page, `/healthz`, `/metrics`). Must never: read a request body, keep a
connection alive after a non-101 response, or log anything (the endpoints decide what is
logged).
"""

from __future__ import annotations

import email.utils
import logging
from dataclasses import dataclass
from http import HTTPStatus

import h11
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol

# Go's default is 1 MiB; a relay's clients send a few hundred bytes, so a hostile peer
# gets 431 much sooner (docs/decisions/0003).
MAX_HEAD_BYTES = 64 * 1024


class HttpError(Exception):
    """The request head is unusable; answer with `status` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str  # without the query string (Go's mux matches on the path only)
    http_version: str
    raw_headers: list[tuple[str, str]]  # lower-case names, in order, repeats kept

    def header(self, name: str) -> str:
        """First value of a header, whitespace-trimmed; "" when absent (Go semantics)."""
        for key, value in self.raw_headers:
            if key == name:
                return value.strip()
        return ""


class HeadReader:
    """Feeds bytes to h11 until one request head is complete."""

    __slots__ = ("_fed", "_h11")

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._fed = 0

    def feed(self, data: bytes) -> RequestHead | None:
        """Returns the head once complete, None while more bytes are needed."""
        conn = self._h11
        conn.receive_data(data)
        self._fed += len(data)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(exc.error_status_hint) from None
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):
            raise HttpError(400)
        # h11 applies its limit only to an incomplete head; one that completes within a
        # single large read would pass it, so the complete head is measured too.
        if self._fed - len(conn.trailing_data[0]) > MAX_HEAD_BYTES:
            raise HttpError(431)
        target = event.target.decode("latin-1")
        path = target.split("?", 1)[0]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        return RequestHead(
            method=event.method.decode("latin-1"),
            path=path,
            http_version=event.http_version.decode("latin-1"),
            raw_headers=headers,
        )

    def trailing(self) -> bytes:
        """Bytes the client sent after the head (early WebSocket frames)."""
        data, _closed = self._h11.trailing_data
        return bytes(data)


def response(
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    close: bool = True,
) -> bytes:
    """One complete HTTP/1.1 response. Content-Length is always set."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_TEXT_PLAIN = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("X-Content-Type-Options", "nosniff"),
]


def error_response(status: int) -> bytes:
    """Go `http.Error(w, "", status)`: body is a single newline (reference §1.2)."""
    return response(status, _TEXT_PLAIN, b"\n")


def not_found() -> bytes:
    """Go ServeMux's 404 page."""
    return response(404, _TEXT_PLAIN, b"404 page not found\n")


def upgrade_required() -> bytes:
    """426 as coder/websocket sends it, advertising the upgrade it wants."""
    return response(426, [("Connection", "Upgrade"), ("Upgrade", "websocket"), *_TEXT_PLAIN], b"\n")


def json_response(body: bytes) -> bytes:
    return response(
        200,
        [("Content-Type", "application/json; charset=utf-8"), ("Cache-Control", "no-store")],
        body,
    )


# websockets logs through the stdlib; the relay's own logger is the only output we allow
# (allowlisted keys), so its records go nowhere.
WS_LOGGER = logging.getLogger("pyrycode_relay.websockets")
WS_LOGGER.addHandler(logging.NullHandler())
WS_LOGGER.propagate = False


def websocket_handshake(head: RequestHead) -> bytes | None:
    """The 101 response for a valid upgrade request, or None with `handshake_error()`.

    Validation is websockets' own (key, version, Upgrade/Connection tokens); only the
    status mapping follows coder/websocket: missing upgrade tokens or HTTP/1.0 → 426,
    another method → 405, anything else wrong → 400.
    """
    headers = Headers(head.raw_headers)
    request = Request(head.path, headers, method=head.method, protocol=f"HTTP/{head.http_version}")
    resp = ServerProtocol(origins=None, logger=WS_LOGGER).accept(request)
    if resp.status_code == 101:
        return resp.serialize()
    return None


def handshake_error(head: RequestHead) -> bytes:
    """The error response for a request `websocket_handshake` refused."""
    connection = head.header("connection").lower()
    upgrade = head.header("upgrade").lower()
    if head.http_version != "1.1" or "upgrade" not in connection or "websocket" not in upgrade:
        return upgrade_required()
    if head.method != "GET":
        return response(405, [("Allow", "GET")], b"\n")
    return error_response(400)
