"""Where a server-id lives: the one interface sessions ask at claim and admission time.

Owns: the `Placement` protocol and its in-memory implementation. A binary's claim and a
phone's admission go through `relay.placement`; single instance (`LocalPlacement`) decides
both synchronously on the local registry. Cluster
mode (`pyrycode_relay.cluster.placement`) implements the same protocol over Redis.
Must never: sit on the per-frame path of a local pair. Frames between a binary and a
phone on the same instance never go through a placement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.client import PhoneSession
    from pyrycode_relay.endpoints.relay import Relay
    from pyrycode_relay.endpoints.server import BinarySession


class PhoneEndpoint(Protocol):
    """What a binary's session addresses: a phone here (`PhoneSession`) or a phone on another
    instance (the cluster's proxy for it)."""

    conn_id: str

    def deliver(self, frame: bytes) -> None: ...
    def close_directive(self, frame: bytes | None, close_code: int) -> None: ...
    def evict(self, code: int, reason: str) -> None: ...
    def pause(self) -> bool:
        """Stop reading this phone while the binary is congested; True if it will be
        resumed (a phone elsewhere cannot be paused from here)."""

    def resume(self) -> None: ...


class RemoteRoute(Protocol):
    """A phone's way to its binary on another instance (cluster mode)."""

    def forward(self, phone: PhoneSession, envelope: bytes) -> bool:
        """Send one wrapped envelope toward the binary; False if the cluster is down."""

    def closed(self, phone: PhoneSession, notice_code: int) -> None:
        """The phone's WebSocket ended; `notice_code` 0 means no close notice is due."""


class Placement(Protocol):
    def before_accept(self, binary: BinarySession, accept: Callable[[], None]) -> None:
        """Run `accept` (the 101, then the session's start) once the binary may be
        accepted; cluster mode first tries to take a free id, so that a binary's 101
        means its claim of a free id is already visible on every instance."""

    def claim(self, binary: BinarySession) -> None:
        """Decide the binary's claim; the session hears `claim_local`, `conflict` or
        `refuse`."""

    def admit(self, phone: PhoneSession) -> None:
        """Decide the phone's registration; the session hears `register_local`,
        `register_remote` or `refuse`."""

    def expired(self, server_id: str) -> None:
        """A grace window freed `server_id` on this instance."""

    def counts(self) -> tuple[int, int]:
        """(binaries not in grace, phones) whose WebSockets are on this instance."""

    def health(self) -> bytes:
        """Extra `/healthz` members (each starting with a comma), or b""."""

    async def start(self) -> None:
        """Before `starting` is logged; may raise BootRefusal."""

    async def stop(self) -> None:
        """After the drain: hand everything this instance holds back, bounded."""


class LocalPlacement:
    """Single instance, in memory: every id lives here."""

    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def before_accept(self, binary: BinarySession, accept: Callable[[], None]) -> None:
        accept()

    def claim(self, binary: BinarySession) -> None:
        binary.claim_local()

    def admit(self, phone: PhoneSession) -> None:
        phone.register_local()

    def expired(self, server_id: str) -> None:
        pass

    def counts(self) -> tuple[int, int]:
        return self.relay.registry.counts()

    def health(self) -> bytes:
        return b""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
