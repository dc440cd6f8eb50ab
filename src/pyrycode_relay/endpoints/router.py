"""Which handler a request head goes to, and the admission order in front of them.

Owns: the reference's three routes (`/healthz`, `/v1/server`, `/v1/client`), our `/readyz`
(404 elsewhere), and the
fixed order of checks before a WebSocket exists (reference §1.2): rate limit → global
cap → per-IP cap → header gate → handshake; then the session decides the registry
outcome as a close code after the 101. Also the loopback listener's `/metrics` and
`/readyz` routes.
Every refusal also gets one `admission_refused` line at DEBUG (`reason` says which check),
built only after the level check, so INFO pays one comparison; the header gate and handshake
failures are logged at DEBUG only (the reference logs them never: a header flood must not
fill the logs at the default level).
Must never: log a header value (a missing header is named, never quoted).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import msgspec

from pyrycode_relay.core.clientip import client_ip
from pyrycode_relay.endpoints.client import PhoneSession
from pyrycode_relay.endpoints.relay import Relay
from pyrycode_relay.endpoints.server import BinarySession
from pyrycode_relay.ops.log import go_quote
from pyrycode_relay.ops.metrics import MetricsExporter
from pyrycode_relay.ops.readiness import Readiness
from pyrycode_relay.transport.connection import Connection
from pyrycode_relay.transport.http import (
    RequestHead,
    error_response,
    handshake_error,
    json_response,
    not_found,
    response,
    websocket_handshake,
)

# Send-buffer thresholds: a phone's socket counts as blocked as soon as any byte of a
# frame is unsent (so the outbox sees exactly one frame "being written"); a binary's
# gets the usual 64 KiB of slack before its phones are paused.
PHONE_WRITE_HIGH = 0
BINARY_WRITE_HIGH = 64 * 1024

_ENDPOINTS = {"/v1/server": "server", "/v1/client": "client"}
_REQUIRED = {
    "server": ("x-pyrycode-server", "x-pyrycode-version", "user-agent"),
    "client": ("x-pyrycode-server", "x-pyrycode-token", "user-agent"),
}


class MainRouter:
    __slots__ = ("readiness", "relay")

    def __init__(self, relay: Relay, readiness: Readiness) -> None:
        self.relay = relay
        self.readiness = readiness

    def route(self, conn: Connection, head: RequestHead) -> None:
        path = head.path
        if path == "/healthz":
            conn.respond(json_response(healthz_body(self.relay)))
            return
        if path == "/readyz":  # like /healthz: not rate limited, not capped, not logged
            conn.respond(readyz_response(self.readiness))
            return
        endpoint = _ENDPOINTS.get(path)
        if endpoint is None:
            conn.respond(not_found())
            return
        relay = self.relay
        stats = relay.stats
        log = relay.log
        ip = client_ip(
            conn.peer_host, head.header("x-forwarded-for"), relay.config.trust_x_forwarded_for
        )
        if not ip or not relay.limiter.allow(ip):
            stats.upgrade(endpoint, "reject_rate_limit")
            stats.register_failures["ratelimit"] += 1
            log.warn("rate_limited", remote=go_quote(ip))
            if log.enabled("debug"):
                log.debug("admission_refused", path=path, reason="rate_limit", remote=ip)
            conn.respond(error_response(429))
            return
        refused = relay.caps.try_acquire(ip)
        if refused is not None:
            stats.cap_rejections[refused] += 1
            log.warn("conn_cap_reached", path=path, remote=conn.peer_host, scope=refused)
            if log.enabled("debug"):
                log.debug(
                    "admission_refused", path=path, reason="conn_cap", scope=refused, remote=ip
                )
            conn.respond(error_response(503))
            return
        conn.on_release = partial(relay.caps.release, ip)
        conn.cap_key = ip
        missing = next((name for name in _REQUIRED[endpoint] if not head.header(name)), None)
        if missing is not None:
            stats.upgrade(endpoint, "reject_headers")
            if log.enabled("debug"):
                log.debug(
                    "admission_refused",
                    path=path,
                    reason="missing_header",
                    header_name=missing,
                    remote=ip,
                )
            conn.respond(error_response(400))
            return
        handshake = websocket_handshake(head)
        if handshake is None:
            if log.enabled("debug"):
                log.debug("admission_refused", path=path, reason="bad_handshake", remote=ip)
            conn.respond(handshake_error(head))
            return
        server_id = head.header("x-pyrycode-server")
        if endpoint == "server":
            binary = BinarySession(
                relay, conn, server_id, head.header("x-pyrycode-version"), conn.peer_host
            )
            relay.placement.before_accept(
                binary,
                partial(conn.accept_websocket, handshake, binary, BINARY_WRITE_HIGH, binary.start),
            )
            return
        phone = PhoneSession(
            relay, conn, server_id, head.header("x-pyrycode-device-name"), conn.peer_host
        )
        conn.accept_websocket(handshake, phone, PHONE_WRITE_HIGH, phone.start)


def healthz_body(relay: Relay) -> bytes:
    """Exact key order, compact, no trailing newline (reference §8.1); cluster mode appends
    one `cluster` member."""
    binaries, phones = relay.placement.counts()
    return (
        b'{"status":"ok","version":'
        + msgspec.json.encode(relay.version)
        + b',"connected_binaries":%d,"connected_phones":%d,"uptime_seconds":%d'
        % (binaries, phones, relay.uptime_seconds())
        + relay.placement.health()
        + b"}"
    )


def readyz_response(readiness: Readiness) -> bytes:
    """200 `ready`, or 503 `not ready: <what is missing>`; one line of plain text."""
    ready, text = readiness.verdict()
    return response(
        200 if ready else 503,
        [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")],
        text.encode() + b"\n",
    )


class MetricsRouter:
    """The loopback metrics listener: `/metrics`, and `/readyz` for local checks (it stays
    open while draining and answers before a TLS certificate exists)."""

    __slots__ = ("_readiness", "_render")

    def __init__(self, exporter: MetricsExporter, readiness: Readiness) -> None:
        self._render: Callable[[], tuple[bytes, str]] = exporter.render
        self._readiness = readiness

    def route(self, conn: Connection, head: RequestHead) -> None:
        if head.path == "/readyz":
            conn.respond(readyz_response(self._readiness))
            return
        if head.path != "/metrics":
            conn.respond(not_found())
            return
        body, content_type = self._render()
        conn.respond(response(200, [("Content-Type", content_type)], body))
