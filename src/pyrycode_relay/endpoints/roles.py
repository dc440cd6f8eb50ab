"""The roles the two sessions play toward each other and toward a placement, as protocols.

Owns: `PhoneEndpoint` (what a binary's session addresses: a phone here, or the cluster's proxy
for a phone elsewhere), `Phone` (a phone session as a placement and a route to another
instance see it), `Binary` (the binary session holding or claiming a server-id, as its phones,
the relay and a placement see it), `RemoteRoute` and `Placement`; and `HeldByConnection`, the
one implementation of `Held` both sessions share.
Must never: import a session, the relay or a placement. Everything that decides where a
server-id lives depends on these, never on the concrete classes, so sessions, placements and
the relay form no import circle, and each can be built in a test with fakes of the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pyrycode_relay.core.registry import Register

if TYPE_CHECKING:
    from pyrycode_relay.transport.connection import Connection

# The `err` of a frame or close notice that met no open binary socket, wherever the phone is.
ERR_BINARY_GONE = "relay: binary connection closed"


class PhoneEndpoint(Protocol):
    """What a binary's session addresses."""

    conn_id: str

    def deliver(self, frame: bytes) -> None: ...
    def close_directive(self, frame: bytes | None, close_code: int) -> None: ...
    def evict(self, code: int, reason: str) -> None: ...
    def pause(self) -> bool:
        """Stop reading this phone while the binary is congested; True if it will be
        resumed (a phone elsewhere cannot be paused from here)."""
        ...

    def resume(self) -> None: ...


class Held(Protocol):
    """A session whose reading can wait for a decision (a claim, an admission)."""

    @property
    def closing(self) -> bool:
        """The WebSocket is over or closing: a decision about it is moot."""
        ...

    def hold(self) -> None:
        """Read nothing more until `release`; what arrives meanwhile waits, unparsed."""
        ...

    def release(self) -> None: ...


class HeldByConnection:
    """`Held` for a session over its own connection: holding is not reading the socket."""

    __slots__ = ()
    conn: Connection

    @property
    def closing(self) -> bool:
        return self.conn.closing

    def hold(self) -> None:
        self.conn.pause_reading()

    def release(self) -> None:
        self.conn.resume_reading()


class Phone(PhoneEndpoint, Held, Protocol):
    """A phone session at admission: the placement answers with one of the last four."""

    server_id: str

    def register_local(self) -> None: ...
    def register_remote(self, route: RemoteRoute) -> None: ...
    def refuse(self, outcome: Register) -> None: ...
    def unavailable(self, code: int, reason: str) -> None: ...
    def end(self, code: int) -> None: ...


class Binary(Held, Protocol):
    """A binary session: claiming its server-id (the placement answers with `claim_local`,
    `conflict` or `refuse`), or holding it (phones send through it, a claimant probes it)."""

    server_id: str

    def claim_local(self) -> None: ...
    def took_over(self) -> None: ...
    def conflict(self) -> None: ...
    def refuse(self, code: int, reason: str) -> None: ...
    def send(self, data: bytes, phone: PhoneEndpoint) -> bool: ...
    def notify(self, data: bytes) -> bool: ...
    def ping(self, on_pong: Callable[[], None]) -> bool: ...
    def close(self, code: int, reason: str = "") -> None: ...


class RemoteRoute(Protocol):
    """A phone's way to its binary on another instance (cluster mode)."""

    def forward(self, phone: Phone, envelope: bytes) -> bool:
        """Send one wrapped envelope toward the binary; False if the cluster is down."""
        ...

    def closed(self, phone: Phone, notice_code: int) -> None:
        """The phone's WebSocket ended; `notice_code` 0 means no close notice is due."""
        ...


class Placement(Protocol):
    """Where a server-id lives: asked at a binary's claim and a phone's admission only."""

    def before_accept(self, binary: Binary, accept: Callable[[], None]) -> None:
        """Run `accept` (the 101, then the session's start) once the binary may be
        accepted; cluster mode first tries to take a free id, so that a binary's 101
        means its claim of a free id is already visible on every instance."""
        ...

    def claim(self, binary: Binary) -> None:
        """Decide the binary's claim; the session hears `claim_local`, `conflict` or
        `refuse`."""
        ...

    def admit(self, phone: Phone) -> None:
        """Decide the phone's registration; the session hears `register_local`,
        `register_remote`, `refuse` or `unavailable`."""
        ...

    def expired(self, server_id: str) -> None:
        """A grace window freed `server_id` on this instance."""
        ...

    def counts(self) -> tuple[int, int]:
        """(binaries not in grace, phones) whose WebSockets are on this instance."""
        ...

    def health(self) -> bytes:
        """Extra `/healthz` members (each starting with a comma), or b""."""
        ...

    async def start(self) -> None:
        """Before `starting` is logged; may raise Refusal."""
        ...

    async def stop(self) -> None:
        """After the drain: hand everything this instance holds back, bounded."""
        ...
