"""Single instance: every server-id lives here.

Owns: `LocalPlacement`, the in-memory `Placement` (endpoints/roles.py): a binary's claim and a
phone's admission are decided at once, on the local registry. Cluster mode
(`pyrycode_relay.cluster.placement`) implements the same protocol over Redis.
Must never: sit on the per-frame path of a local pair. Frames between a binary and a phone
on the same instance never go through a placement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyrycode_relay.core.registry import Registry
from pyrycode_relay.endpoints.roles import Binary, Phone


class LocalPlacement:
    """Concurrency: the event loop's thread; every decision is synchronous."""

    __slots__ = ("_registry",)

    def __init__(self, registry: Registry[Any, Any]) -> None:
        self._registry = registry

    def before_accept(self, binary: Binary, accept: Callable[[], None]) -> None:
        accept()

    def claim(self, binary: Binary) -> None:
        binary.claim_local()

    def admit(self, phone: Phone) -> None:
        phone.register_local()

    def expired(self, server_id: str) -> None:
        pass

    def counts(self) -> tuple[int, int]:
        return self._registry.counts()

    def health(self) -> bytes:
        return b""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
