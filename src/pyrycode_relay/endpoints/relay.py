"""The state one relay process shares between its endpoints.

Owns: wiring the pure core pieces (registry, limiter, caps, budget, counters) and the push
waker together with the config and the logger, grace-timer scheduling and grace expiry, and the
`shutting_down` flag.
Must never: hold per-connection state; sessions own that.
"""

from __future__ import annotations

import asyncio
import time

from pyrycode_relay.core.config import Config
from pyrycode_relay.core.conncap import ConnectionCaps
from pyrycode_relay.core.outbox import BufferBudget
from pyrycode_relay.core.ratelimit import TokenBucketLimiter
from pyrycode_relay.core.registry import GraceToken, Registry
from pyrycode_relay.core.stats import RelayStats
from pyrycode_relay.endpoints.placement import LocalPlacement
from pyrycode_relay.endpoints.roles import Binary, PhoneEndpoint, Placement
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.push import PushSender, PushWaker


class Relay:
    """What every session of one process shares: config, log, registry, limits, counters,
    the push waker and the placement.

    Concurrency: the loop's thread only; nothing here awaits. Grace timers are loop timers
    whose expiry evicts the phones left on a released id.
    """

    def __init__(
        self, config: Config, log: Logger, version: str, push_sender: PushSender | None = None
    ) -> None:
        self.config = config
        self.log = log
        self.version = version
        self.loop = asyncio.get_running_loop()
        self.stats = RelayStats()
        self.registry: Registry[Binary, PhoneEndpoint] = Registry()
        self.limiter = TokenBucketLimiter(
            config.rate_limit_burst, config.rate_limit_interval, time.monotonic
        )
        self.caps = ConnectionCaps(config.max_connections, config.max_connections_per_ip)
        self.budget = BufferBudget(config.max_buffered_bytes)
        self.push = PushWaker(  # push off when there is no sender
            log,
            push_sender,
            burst=config.push_burst,
            interval=config.push_interval,
            max_in_flight=config.push_max_in_flight,
        )
        self.placement: Placement = LocalPlacement(
            self.registry
        )  # the server swaps in cluster mode
        self.started = time.monotonic()
        self.shutting_down = False

    def uptime_seconds(self) -> int:
        return max(0, int(time.monotonic() - self.started))

    def arm_grace(self, server_id: str, token: GraceToken) -> None:
        self.loop.call_later(self.config.grace_period, self._grace_expired, server_id, token)

    def _grace_expired(self, server_id: str, token: GraceToken) -> None:
        phones = self.registry.expire(server_id, token)
        if phones is None:
            return  # stale: the slot was reclaimed or taken over meanwhile
        self.stats.grace_expiries += 1
        self.placement.expired(server_id)
        for phone in phones:
            phone.evict(1000, "")

    def evict_reclaimed(self, phones: list[PhoneEndpoint]) -> None:
        """Phones of a reclaimed or taken-over slot: 4404, no close notice (§5.1)."""
        self.stats.reclaim_evictions += len(phones)
        for phone in phones:
            phone.evict(4404, "binary reclaimed server-id")
