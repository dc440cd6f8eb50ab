"""What the parts of one cluster instance share.

Owns: `ClusterContext` — the relay, the Redis store, the bus, this instance's id and lease,
and the tasks the parts spawn (all cancelled at stop) — and the close codes and reasons only
a cluster has.
Must never: decide anything (claims, pairs and liveness do).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pyrycode_relay.cluster.bus import Bus
    from pyrycode_relay.cluster.store import OwnershipStore
    from pyrycode_relay.endpoints.relay import Relay

UNAVAILABLE: Final = 1013  # RFC 6455 "try again later"
REASON_UNAVAILABLE: Final = "cluster unavailable"
REASON_OWNER_GONE: Final = "server owner gone"


class ClusterContext:
    """Concurrency: the loop's thread; `spawn` keeps a reference to every task until it ends."""

    __slots__ = ("bus", "lease", "me", "relay", "store", "tasks")

    def __init__(
        self, relay: Relay, store: OwnershipStore, bus: Bus, me: str, lease: float
    ) -> None:
        self.relay = relay
        self.store = store
        self.bus = bus
        self.me = me
        self.lease = lease
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
