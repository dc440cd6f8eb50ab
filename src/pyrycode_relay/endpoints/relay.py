"""The state one relay process shares between its endpoints.

Owns: wiring the pure core pieces (registry, limiter, caps, budget, counters) and the push
waker together with the config and the logger, grace-timer scheduling and grace expiry, the
`shutting_down` flag, and what every WebSocket's start and end record (the two histograms and
the `ws_closed` line), whichever session it belongs to.
Must never: hold per-connection state; sessions own that. Nor observe anything per frame.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from pyrycode_relay.core.config import Config
from pyrycode_relay.core.conncap import ConnectionCaps
from pyrycode_relay.core.envelope import close_notice
from pyrycode_relay.core.outbox import BufferBudget
from pyrycode_relay.core.ratelimit import TokenBucketLimiter
from pyrycode_relay.core.registry import GraceToken, Registry
from pyrycode_relay.core.stats import RelayStats
from pyrycode_relay.endpoints.placement import LocalPlacement
from pyrycode_relay.endpoints.roles import ERR_BINARY_GONE, Binary, PhoneEndpoint, Placement
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.push import PushSender, PushWaker

if TYPE_CHECKING:
    from pyrycode_relay.transport.connection import Connection


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
        # The loop time each armed grace window ends (by server-id, with its token): a
        # handover carries what is left of them.
        self.grace_ends: dict[str, tuple[GraceToken, float]] = {}

    def uptime_seconds(self) -> int:
        return max(0, int(time.monotonic() - self.started))

    def refused_after_upgrade(
        self, path: str, reason: str, server_id: str, close_code: int, remote: str
    ) -> None:
        """One `admission_refused` line at DEBUG for a session the registry or the cluster
        refused after its 101 (the router logs the refusals before it); built only when
        debug is on."""
        log = self.log
        if log.enabled("debug"):
            log.debug(
                "admission_refused",
                path=path,
                reason=reason,
                server_id=server_id,
                close_code=close_code,
                remote=remote,
            )

    def ws_opened(self, endpoint: str, conn: Connection) -> None:
        """A session's first step, right after its 101 was written."""
        self.stats.upgrade_seconds[endpoint].observe(conn.opened_at - conn.accepted_at)

    def ws_ended(self, endpoint: str, conn: Connection, server_id: str, conn_id: str) -> None:
        """A session's teardown, once per WebSocket however it ended (refused after the 101,
        closed by either side, or dropped): its lifetime, and one line saying how."""
        seconds = self.loop.time() - conn.opened_at
        self.stats.connection_seconds[endpoint].observe(seconds)
        close_code, closed_by = conn.end_state
        self.log.info(
            "ws_closed",
            endpoint=endpoint,
            server_id=server_id,
            conn_id=conn_id,
            close_code=close_code,
            closed_by=closed_by,
            duration_ms=int(seconds * 1000),
        )

    def arm_grace(self, server_id: str, token: GraceToken, delay: float | None = None) -> None:
        """Free `server_id` after the grace period (or `delay`: what a handover left)."""
        delay = self.config.grace_period if delay is None else delay
        self.grace_ends[server_id] = (token, self.loop.time() + delay)
        self.loop.call_later(delay, self._grace_expired, server_id, token)

    def _grace_expired(self, server_id: str, token: GraceToken) -> None:
        armed = self.grace_ends.get(server_id)
        if armed is not None and armed[0] is token:
            del self.grace_ends[server_id]
        phones = self.registry.expire(server_id, token)
        if phones is None:
            return  # stale: the slot was reclaimed or taken over meanwhile
        self.stats.grace_expiries += 1
        self.placement.expired(server_id)
        for phone in phones:
            phone.evict(1000, "")

    def to_binary(self, server_id: str, envelope: bytes, phone: PhoneEndpoint) -> bool | None:
        """A phone's wrapped frame, to the binary holding `server_id` now (looked up on
        every frame: after a reclaim it goes to the new holder). None: no binary holds it;
        False: its socket is closed; True: written (and counted)."""
        binary = self.registry.binary(server_id)
        if binary is None:
            return None
        if not binary.send(envelope, phone):
            return False
        self.stats.frames_phone_to_binary += 1
        return True

    def phone_gone(
        self, server_id: str, phone: PhoneEndpoint, binary: Binary | None, notice_code: int
    ) -> None:
        """A registered phone's WebSocket ended (here, or on another instance): the binary
        it was admitted to, if it still holds the id, hears a close notice with
        `notice_code` (0: none is due; none at shutdown either), then the phone leaves the
        registry."""
        conn_id = phone.conn_id
        if (
            notice_code
            and not self.shutting_down
            and binary is not None
            and self.registry.binary(server_id) is binary
            and not binary.notify(close_notice(conn_id, notice_code))
        ):
            self.log.info(
                "phone_close_notice_send_failed",
                server_id=server_id,
                conn_id=conn_id,
                close_code=notice_code,
                err=ERR_BINARY_GONE,
            )
        self.registry.unregister_phone(server_id, conn_id, phone)
        self.log.info("phone_unregistered", server_id=server_id, conn_id=conn_id)

    def evict_reclaimed(self, phones: list[PhoneEndpoint]) -> None:
        """Phones of a reclaimed or taken-over slot: 4404, no close notice (§5.1)."""
        self.stats.reclaim_evictions += len(phones)
        for phone in phones:
            phone.evict(4404, "binary reclaimed server-id")
