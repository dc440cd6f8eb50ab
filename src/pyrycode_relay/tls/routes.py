"""Routers only the TLS modes use: the Host gate, and the port-80 ACME challenge listener.

Owns: `HostGate` — in front of the main router when a --domain is configured, a request
whose Host (port removed, compared case-insensitively) is not the domain gets 421 with no
body, `/healthz` included (reference §1.1, Go's autocert `EnforceHost`); and
`AcmeHttpRouter` — `/.well-known/acme-challenge/<token>` answered from the in-memory
challenge map (403 for another Host, 404 for an unknown token), every other request 404,
never a redirect (reference §1.3, ADR-0002 upstream); a served challenge is reported to
`on_fetched` with the requester's address (the ACME owner logs it).
Must never: log (challenge tokens and Host values are not log material), rate-limit the
challenge listener, or touch the insecure-mode path (which uses MainRouter directly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pyrycode_relay.transport.connection import Connection, Router
from pyrycode_relay.transport.http import RequestHead, not_found, response

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


def host_without_port(host: str) -> str:
    """`Example.com:443` → `example.com`; `[::1]:443` → `::1`; lower-cased."""
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        return (host[1:end] if end > 0 else host).lower()
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".").lower()


def misdirected() -> bytes:
    """421 with an empty body (Go writes only the status line and headers)."""
    return response(421, [], b"")


class HostGate:
    """Wraps a router: only requests for `domain` get through."""

    __slots__ = ("_domain", "_inner")

    def __init__(self, inner: Router, domain: str) -> None:
        self._inner = inner
        self._domain = domain.rstrip(".").lower()

    def route(self, conn: Connection, head: RequestHead) -> None:
        if host_without_port(head.header("host")) != self._domain:
            conn.respond(misdirected())
            return
        self._inner.route(conn, head)


class AcmeHttpRouter:
    """The `--http-listen` listener in ACME mode."""

    __slots__ = ("_challenges", "_domain", "_on_fetched")

    def __init__(
        self,
        domain: str,
        challenges: Mapping[str, str],
        on_fetched: Callable[[str], None] | None = None,
    ) -> None:
        self._domain = domain.rstrip(".").lower()
        self._challenges = challenges  # token → key authorization, filled by tls.acme
        self._on_fetched = on_fetched

    def route(self, conn: Connection, head: RequestHead) -> None:
        if not head.path.startswith(CHALLENGE_PREFIX):
            conn.respond(not_found())
            return
        if host_without_port(head.header("host")) != self._domain:
            conn.respond(response(403, [("Content-Type", "text/plain; charset=utf-8")], b"\n"))
            return
        token = head.path[len(CHALLENGE_PREFIX) :]
        validation = self._challenges.get(token)
        if validation is None:
            conn.respond(not_found())
            return
        conn.respond(response(200, [("Content-Type", "text/plain")], validation.encode("ascii")))
        if self._on_fetched is not None:
            self._on_fetched(conn.peer_host)
