"""Fakes for in-process tests of sessions and placements: a connection that records what a
session did to it, and a real Relay on JSON logs."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import cast

from pyrycode_relay.core.config import parse_args
from pyrycode_relay.endpoints.client import PhoneSession
from pyrycode_relay.endpoints.relay import Relay
from pyrycode_relay.endpoints.server import BinarySession
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.transport.connection import Connection


class FakeConn:
    """What a session sees of its connection; records what the session did to it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.closing = False
        self.write_paused = False
        self.batch_full = False
        self.reading = True
        self.heartbeat = False
        self.pings: list[Callable[[], None]] = []
        self.timed_out_reading = False
        self.peer_close_code: int | None = None
        self.relay_close_code: int | None = None
        self.handler: BinarySession | PhoneSession | None = None
        self.accepted_at = 0.0
        self.opened_at = 0.0

    @property
    def end_state(self) -> tuple[int, str]:
        if self.peer_close_code is not None:
            return self.peer_close_code, "peer"
        if self.relay_close_code is not None:
            return self.relay_close_code, "relay"
        return 1006, "none"

    def send_text(self, data: bytes) -> bool:
        if self.closing:
            return False
        self.sent.append(data)
        return True

    def close(self, code: int, reason: str = "") -> None:
        if self.closing:
            return
        self.closing = True
        self.closed = (code, reason)
        self.relay_close_code = code
        if self.handler is not None:
            handler, self.handler = self.handler, None
            handler.on_closed()

    def abort(self) -> None:
        self.close(1006)

    def ping(self, on_pong: Callable[[], None]) -> bool:
        if self.closing:
            return False
        self.pings.append(on_pong)
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def start_heartbeat(self) -> None:
        self.heartbeat = True

    def messages(self) -> list[object]:
        return [json.loads(m) for m in self.sent]


def make_relay(*flags: str) -> tuple[Relay, io.StringIO]:
    out = io.StringIO()
    config = parse_args(["--insecure-listen=127.0.0.1:8080", *flags], {})
    return Relay(config, Logger(out, "json"), "test"), out


def binary(relay: Relay, sid: str = "s1") -> tuple[BinarySession, FakeConn]:
    conn = FakeConn()
    session = BinarySession(relay, cast(Connection, conn), sid, "0.11.0", "127.0.0.1")
    conn.handler = session
    session.start()
    return session, conn


def phone(relay: Relay, sid: str = "s1") -> tuple[PhoneSession, FakeConn]:
    conn = FakeConn()
    session = PhoneSession(relay, cast(Connection, conn), sid, "pixel", "127.0.0.1")
    conn.handler = session
    session.start()
    return session, conn


def events(out: io.StringIO) -> list[str]:
    return [json.loads(line)["msg"] for line in out.getvalue().splitlines()]
