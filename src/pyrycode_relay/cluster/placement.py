"""Cluster mode: several relay instances act as one relay, over Redis (README §5).

Owns: `ClusterPlacement`, the Redis-backed `Placement` of one instance: its Redis clients,
the store and the bus, start-up (a live duplicate `--instance-id` is refused) and an orderly
stop (peers told, ids handed back), the bus's up/down and the dispatch of its messages to the
parts that decide — `Claims` (claims.py), `Pairs` (pairs.py), `Liveness` (liveness.py) —
and the counts, figures and `/healthz` members a cluster adds.
Must never: touch a pair whose binary and phone share this instance — those never leave
the local registry and keep working while Redis is down — or wait on Redis in a frame's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pyrycode_relay.cluster import codec
from pyrycode_relay.cluster.bus import FAILURES, Bus
from pyrycode_relay.cluster.claims import Claims
from pyrycode_relay.cluster.context import REASON_UNAVAILABLE, UNAVAILABLE, ClusterContext
from pyrycode_relay.cluster.liveness import Liveness
from pyrycode_relay.cluster.pairs import Pairs
from pyrycode_relay.cluster.store import InstanceIdTaken, OwnershipStore
from pyrycode_relay.core.duration import format_duration
from pyrycode_relay.ops.boot import MSG_INSTANCE_LIVE
from pyrycode_relay.ops.log import millis
from pyrycode_relay.ops.metrics import ClusterFigures
from pyrycode_relay.ops.refusal import Refusal

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.relay import Relay
    from pyrycode_relay.endpoints.roles import Binary, Phone

STOP_TIMEOUT: Final = 2.0
REDIS_CONNECTIONS: Final = 32


class ClusterPlacement:
    """The `Placement` of one instance in a cluster.

    Concurrency: the loop's thread. Claims and admissions that need Redis or a peer run as
    tasks of the context's (cancelled at `stop`); bus messages arrive as synchronous
    callbacks from the bus's subscriber task, and the lease ticker is one more task. It
    closes sessions only through their roles (refuse, evict, close on a lost lease), and
    owns the Redis clients, which `stop` closes.
    """

    def __init__(self, relay: Relay) -> None:
        config = relay.config
        self.relay = relay
        self.me = config.instance_id or f"relay-{secrets.token_hex(4)}"
        # Our liveness key holds `<process>.<epoch>`: the process part names our bus format
        # and tells a restarted process from ours, the epoch grows with every bus
        # (re)connection, so peers see that we lost Redis (and with it every message
        # meanwhile) even if we came back within one lease.
        self.process = codec.process_token(codec.VERSION, secrets.token_hex(8))
        self._epoch = 0
        self.lease = config.cluster_lease
        timeout = max(0.25, min(5.0, self.lease / 2))
        settings: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),  # a failure is reported at once, not retried blind
            "client_name": f"pyrycode-relay:{self.me}",  # who is who in CLIENT LIST
        }
        url = config.cluster_redis
        # A bounded pool that makes a burst of admissions queue for a connection (instead
        # of failing once a default limit is hit).
        pool = BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=timeout, **settings
        )
        self.client: Redis = Redis.from_pool(pool)
        self.store = OwnershipStore(self.client, self.me, self.lease)
        # Two connections: a resubscription may start before the last one handed its
        # connection back (and a blocking pool, so an overlap waits rather than fails). No
        # read timeout on it (the Bus says why).
        subscriber = {**settings, "socket_timeout": None}
        self.bus = Bus(
            Redis.from_pool(
                BlockingConnectionPool.from_url(
                    url, max_connections=2, timeout=timeout, **subscriber
                )
            ),
            Redis.from_pool(ConnectionPool.from_url(url, max_connections=1, **settings)),
            self.me,
            self.process + "0",
            connect_timeout=timeout,
            queue_limit=config.max_buffered_bytes,
            on_peer=self._on_peer,
            on_message=self._on_message,
            on_foreign=self._on_foreign,
            on_up=self._on_up,
            on_down=self._on_down,
        )
        self.ctx = ClusterContext(relay, self.store, self.bus, self.me, self.lease)
        self.claims = Claims(self.ctx)
        self.pairs = Pairs(self.ctx, self.claims)
        self.liveness = Liveness(self.ctx, self.claims, self.pairs, self.process)
        self._ticker: asyncio.Task[None] | None = None

    # -- Placement ------------------------------------------------------------------

    def before_accept(self, binary: Binary, accept: Callable[[], None]) -> None:
        self.claims.before_accept(binary, accept)

    def claim(self, binary: Binary) -> None:
        self.claims.claim(binary)

    def admit(self, phone: Phone) -> None:
        if self.relay.registry.binary(phone.server_id) is not None:
            phone.register_local()
            return
        self.pairs.admit(phone)

    def expired(self, server_id: str) -> None:
        if self.bus.up:
            self.ctx.spawn(self.claims.release([server_id]))

    def counts(self) -> tuple[int, int]:
        binaries, phones = self.relay.registry.counts()
        pairs = self.pairs
        return binaries, phones - pairs.proxied_phones() + pairs.remote_phones()

    def figures(self) -> ClusterFigures:
        return ClusterFigures(
            published=self.bus.stats.published,
            received=self.bus.stats.received,
            remote_phones=self.pairs.remote_phones(),
            redis_up=self.bus.up,
            lease_renew_failures=self.liveness.lease_renew_failures,
        )

    def health(self) -> bytes:
        return b',"cluster":{"instance_id":%s,"redis":"%s"}' % (
            msgspec.json.encode(self.me),
            b"up" if self.bus.up else b"down",
        )

    async def start(self) -> None:
        log = self.relay.log
        try:
            registered = await self._register_instance()
        except FAILURES as exc:
            log.warn("cluster_redis_down", instance_id=self.me, err=type(exc).__name__)
        else:
            if not registered:
                await self.bus.close(0.0)
                await self.client.aclose()
                raise Refusal(
                    MSG_INSTANCE_LIVE,
                    {
                        "value": self.me,
                        "fix": "give every instance its own --instance-id, or omit it",
                    },
                )
        await self.bus.start()
        self._ticker = asyncio.create_task(self.liveness.run(), name="cluster-lease")

    async def _register_instance(self) -> bool:
        """Our instance key, NX. A key left by a previous process with our id (killed, not
        drained) lapses within one lease; a live duplicate keeps renewing it. The wait is
        announced at once, so an operator does not watch a silent start-up for 1.5 leases
        before the refusal."""
        loop = asyncio.get_running_loop()
        wait = self.lease * 1.5
        deadline = loop.time() + wait
        announced = False
        while not await self.store.register_instance(self.bus.incarnation):
            if loop.time() >= deadline:
                return False
            if not announced:
                announced = True
                self.relay.log.warn(
                    "cluster_instance_id_held",
                    instance_id=self.me,
                    wait_ms=millis(wait),
                    reason=(
                        "another live instance holds this --instance-id (or a process with it"
                        " stopped without draining); waiting up to"
                        f" {format_duration(wait)} for its key to expire, then refusing to start"
                    ),
                )
            await asyncio.sleep(self.lease / 10)
        return True

    async def stop(self) -> None:
        """After the drain: tell edges we are gone, hand our ids back, close Redis."""
        if self._ticker is not None:
            self._ticker.cancel()
        tasks = self.ctx.tasks
        for task in list(tasks):
            task.cancel()
        if self.bus.up:
            for edge in list(self.pairs.proxies):
                self.bus.send(edge, codec.Bye())
            with contextlib.suppress(*FAILURES):
                await asyncio.wait_for(self._leave(), STOP_TIMEOUT)
        await self.bus.close(STOP_TIMEOUT)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._ticker is not None:
            await asyncio.gather(self._ticker, return_exceptions=True)
        await self.client.aclose()

    async def _leave(self) -> None:
        await self.store.release(self.relay.registry.server_ids())
        await self.store.leave(self.process)

    # -- the bus --------------------------------------------------------------------

    def _on_peer(self, sender: str, incarnation: str) -> None:
        self.liveness.on_peer(sender, incarnation)

    def _on_foreign(self, err: str) -> None:
        self.relay.log.warn("cluster_bus_foreign_message", instance_id=self.me, err=err)

    def _on_message(self, sender: str, msg: codec.Message) -> None:
        pairs = self.pairs
        if isinstance(msg, codec.Frame):
            pairs.on_frame(sender, msg.server_id, msg.conn_id, msg.envelope)
        elif isinstance(msg, codec.ToPhone):
            pairs.to_phone(sender, msg)
        elif isinstance(msg, codec.Gone):
            pairs.on_gone(sender, msg.server_id, msg.conn_id, msg.notice_code)
        elif isinstance(msg, codec.Admit):
            pairs.on_admit(sender, msg.req, msg.server_id, msg.conn_id)
        elif isinstance(msg, codec.Probe):
            self.claims.on_probe(sender, msg.req, msg.server_id)
        elif isinstance(msg, codec.Bye):
            self.liveness.peer_lost(sender, None)

    async def _on_up(self) -> None:
        """(Re)connected: assert our instance key and leases before anything is routed."""
        self._epoch += 1
        self.bus.incarnation = f"{self.process}{self._epoch}"
        try:
            await self.store.keep_alive(self.bus.incarnation, self.process)
        except InstanceIdTaken:
            self.relay.log.error("cluster_instance_id_taken", instance_id=self.me)
            raise
        await self.liveness.renew()
        self.relay.log.info("cluster_redis_up", instance_id=self.me)

    def _on_down(self, err: str) -> None:
        """Redis is unreachable. Messages published meanwhile are lost for good, so every
        cross-instance pair ends here, on both sides, with 1013 (try again later)."""
        self.relay.log.warn("cluster_redis_down", instance_id=self.me, err=err)
        self.pairs.end_all(UNAVAILABLE, REASON_UNAVAILABLE, UNAVAILABLE)
