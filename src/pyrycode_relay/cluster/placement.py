"""Cluster mode: several relay instances act as one relay, over Redis (README §5).

Owns: the Redis-backed `Placement` — a claim of an id held elsewhere (acquire, remote
conflict probe, compare-and-set takeover), admission of a phone whose binary is on another
instance (the owner applies 4404/4429), both ends of a cross-instance pair (`_Route` on the
phone's instance, `RemotePhone` in the owner's registry), lease renewal and peer liveness
every lease/3, and what a Redis outage or a vanished peer costs (close codes 1013/1011).
Must never: touch a pair whose binary and phone share this instance — those never leave
the local registry and keep working while Redis is down — or wait on Redis in a frame's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pyrycode_relay.cluster import codec
from pyrycode_relay.cluster.bus import FAILURES, Bus, BusDown
from pyrycode_relay.cluster.store import InstanceIdTaken, OwnershipStore
from pyrycode_relay.core.envelope import close_notice
from pyrycode_relay.core.registry import Register
from pyrycode_relay.ops.boot import MSG_INSTANCE_LIVE
from pyrycode_relay.ops.metrics import ClusterFigures
from pyrycode_relay.ops.refusal import Refusal
from pyrycode_relay.transport.timers import probe

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.relay import Relay
    from pyrycode_relay.endpoints.roles import Binary, Phone

_T = TypeVar("_T")

UNAVAILABLE: Final = 1013  # RFC 6455 "try again later"
REASON_UNAVAILABLE: Final = "cluster unavailable"
REASON_OWNER_GONE: Final = "server owner gone"
STOP_TIMEOUT: Final = 2.0
REDIS_CONNECTIONS: Final = 32
_NO_PHONES: Final[dict[str, Phone]] = {}


class ClusterStats:
    __slots__ = ("lease_renew_failures",)

    def __init__(self) -> None:
        self.lease_renew_failures = 0


class _ClaimsInFlight:
    """Server-ids with a claim in flight on this instance. An admission for one waits for
    the claim's outcome: the lease may already name us while the registry does not hold
    the binary yet, and a phone must not get 4404 out of that gap."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def __contains__(self, server_id: object) -> bool:
        return server_id in self._count

    def begin(self, server_id: str) -> None:
        self._count[server_id] = self._count.get(server_id, 0) + 1

    def end(self, server_id: str) -> None:
        left = self._count[server_id] - 1
        if left:
            self._count[server_id] = left
            return
        del self._count[server_id]
        for waiter in self._waiters.pop(server_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def settled(self, server_id: str, within: float) -> None:
        if server_id not in self._count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(server_id, []).append(waiter)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, within)


class RemotePhone:
    """In the owner's registry: a phone whose WebSocket is on instance `edge`. What the
    binary's session does to it becomes a bus message to that instance."""

    __slots__ = ("binary", "conn_id", "edge", "ended", "paused", "placement", "server_id")

    def __init__(
        self, placement: ClusterPlacement, edge: str, server_id: str, conn_id: str
    ) -> None:
        self.placement = placement
        self.edge = edge
        self.server_id = server_id
        self.conn_id = conn_id
        self.binary: Binary | None = None  # the holder when it was admitted
        self.ended = False  # an END is on its way: later frames need no second one
        self.paused = False  # a PAUSE is in force at the edge

    def deliver(self, frame: bytes) -> None:
        self.placement.bus.send(self.edge, codec.Deliver(self.conn_id, frame))

    def close_directive(self, frame: bytes | None, close_code: int) -> None:
        self.placement.bus.send(self.edge, codec.Directive(self.conn_id, frame, close_code))

    def evict(self, code: int, reason: str) -> None:
        # Called after the registry let go of us (reclaim, takeover, expiry).
        self.placement.forget_proxy(self)
        self.placement.bus.send(self.edge, codec.Evict(self.conn_id, code, reason))

    def pause(self) -> bool:
        """The binary is congested: the edge stops reading the phone, as it would here.
        Frames already on the bus still arrive (bounded by the bus queue limit)."""
        if self.paused:
            return False  # already in the binary's blocked list
        self.paused = True
        self.placement.bus.send(self.edge, codec.Pause(self.conn_id))
        return True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.placement.bus.send(self.edge, codec.Resume(self.conn_id))


class _Route:
    """On the phone's instance: the way to its binary's owner."""

    __slots__ = ("owner", "placement")

    def __init__(self, placement: ClusterPlacement, owner: str) -> None:
        self.placement = placement
        self.owner = owner

    def forward(self, phone: Phone, envelope: bytes) -> bool:
        return self.placement.bus.send(
            self.owner, codec.Frame(phone.server_id, phone.conn_id, envelope)
        )

    def closed(self, phone: Phone, notice_code: int) -> None:
        placement = self.placement
        _discard(placement.edges, self.owner, phone.conn_id, phone)
        placement.bus.send(self.owner, codec.Gone(phone.server_id, phone.conn_id, notice_code))


class ClusterPlacement:
    """The `Placement` of one instance in a cluster.

    Concurrency: the loop's thread. Claims and admissions that need Redis or a peer run as
    tasks it owns (`_spawn`; cancelled at `stop`); bus messages arrive as synchronous
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
        self.stats = ClusterStats()
        # phone side: owner instance → our phones whose binary it holds
        self.edges: dict[str, dict[str, Phone]] = {}
        # owner side: edge instance → proxies in our registry for its phones
        self.proxies: dict[str, dict[str, RemotePhone]] = {}
        self._routes: dict[str, _Route] = {}
        self._peers: dict[str, str] = {}  # instance → incarnation last heard from it
        self._tasks: set[asyncio.Task[Any]] = set()
        # binaries between their id lookup and their claim: the owner found (None: failed)
        self._acquired: dict[Binary, str | None] = {}
        self._claims = _ClaimsInFlight()
        self._ticker: asyncio.Task[None] | None = None

    # -- Placement ------------------------------------------------------------------

    def before_accept(self, binary: Binary, accept: Callable[[], None]) -> None:
        if self.relay.registry.binary(binary.server_id) is not None or not self.bus.up:
            accept()  # held here already, or Redis is down (the claim then says 1013)
            return
        binary.hold()  # nothing is read until the 101
        self._claims.begin(binary.server_id)
        self._spawn(self._acquire(binary, accept))

    async def _acquire(self, binary: Binary, accept: Callable[[], None]) -> None:
        sid = binary.server_id
        owner: str | None
        try:
            owner = await self.store.acquire(sid)
        except FAILURES:
            owner = None
        try:
            if binary.closing:  # the client left before its 101
                if owner == self.me:
                    await self._release([sid])
                return
            binary.release()
            self._acquired[binary] = owner
            accept()  # the 101, then `claim` at once
        finally:
            self._claims.end(sid)

    def claim(self, binary: Binary) -> None:
        owner = self._acquired.pop(binary, None)
        if self.relay.registry.binary(binary.server_id) is not None or owner == self.me:
            binary.claim_local()  # held here (live or in grace), or the id was free
            return
        if owner is None:  # Redis failed (or was down) when the id was looked up
            binary.refuse(UNAVAILABLE, REASON_UNAVAILABLE)
            return
        binary.hold()  # until decided, nothing is read
        self._claims.begin(binary.server_id)
        self._spawn(self._claim(binary, owner))

    def admit(self, phone: Phone) -> None:
        if self.relay.registry.binary(phone.server_id) is not None:
            phone.register_local()
            return
        phone.hold()  # early frames wait for the owner's answer
        self._spawn(self._admit(phone))

    def expired(self, server_id: str) -> None:
        if self.bus.up:
            self._spawn(self._release([server_id]))

    def counts(self) -> tuple[int, int]:
        binaries, phones = self.relay.registry.counts()
        proxies = sum(len(p) for p in self.proxies.values())
        return binaries, phones - proxies + self._remote_phones()

    def _remote_phones(self) -> int:
        return sum(len(p) for p in self.edges.values())

    def figures(self) -> ClusterFigures:
        return ClusterFigures(
            published=self.bus.stats.published,
            received=self.bus.stats.received,
            remote_phones=self._remote_phones(),
            redis_up=self.bus.up,
            lease_renew_failures=self.stats.lease_renew_failures,
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
        self._ticker = asyncio.create_task(self._tick_loop(), name="cluster-lease")

    async def _register_instance(self) -> bool:
        """Our instance key, NX. A key left by a previous process with our id (killed, not
        drained) lapses within one lease; a live duplicate keeps renewing it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease * 1.5
        while not await self.store.register_instance(self.bus.incarnation):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(self.lease / 10)
        return True

    async def stop(self) -> None:
        """After the drain: tell edges we are gone, hand our ids back, close Redis."""
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.bus.up:
            for edge in list(self.proxies):
                self.bus.send(edge, codec.Bye())
            with contextlib.suppress(*FAILURES):
                await asyncio.wait_for(self._leave(), STOP_TIMEOUT)
        await self.bus.close(STOP_TIMEOUT)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ticker is not None:
            await asyncio.gather(self._ticker, return_exceptions=True)
        await self.client.aclose()

    async def _leave(self) -> None:
        await self.store.release(self.relay.registry.server_ids())
        await self.store.leave(self.process)

    # -- claims ---------------------------------------------------------------------

    async def _claim(self, binary: Binary, owner: str) -> None:
        try:
            await self._claim_from(binary, owner)
        finally:
            self._claims.end(binary.server_id)

    async def _claim_from(self, binary: Binary, owner: str) -> None:
        """`owner` (another instance) holds the lease: have it probe its binary."""
        sid = binary.server_id
        try:
            # The owner pings its binary for up to --conflict-probe-timeout; silence from
            # the owner itself (killed, partitioned) a little longer is a failed probe too.
            incarnation = (await self.store.incarnations([owner]))[owner]
            if incarnation is None:
                verdict = None  # the owner's process is gone: nobody to probe
            elif not codec.speaks_our_format(incarnation):
                # A release we cannot talk to (a roll across a bus format change): its
                # silence would read as a dead binary and take a live one over. Come back
                # later; once that release is drained, its keys are gone.
                binary.refuse(UNAVAILABLE, REASON_UNAVAILABLE)
                return
            else:
                verdict = await self.bus.request(
                    owner, lambda req: codec.Probe(req, sid), within=self._verdict_time()
                )
            if verdict == codec.ALIVE:
                binary.conflict()
                return
            if not await self.store.take(sid, owner):
                binary.conflict()  # another claimant won the race
                return
        except (*FAILURES, BusDown):
            binary.refuse(UNAVAILABLE, REASON_UNAVAILABLE)
            return
        finally:
            binary.release()
        if binary.closing:
            if self.relay.registry.binary(sid) is None:
                self._spawn(self._release([sid]))  # the claimant left: do not sit on the id
            return
        if verdict != codec.FREE:
            binary.took_over()
        binary.claim_local()

    def _on_probe(self, claimant: str, req: int, sid: str) -> None:
        """A claimant elsewhere found our lease on `sid`: is our holder alive?"""
        registry = self.relay.registry
        holder = registry.binary(sid)
        if holder is None:
            self._spawn(self._hand_over(claimant, req, sid, codec.FREE))
            return
        if registry.in_grace(sid):
            self._surrender(sid, holder)
            self._spawn(self._hand_over(claimant, req, sid, codec.FREE))
            return

        def silent() -> None:
            if registry.binary(sid) is not holder:
                self.bus.reply(claimant, req, codec.ALIVE)  # a newer holder: let it keep the id
                return
            self._surrender(sid, holder)
            holder.close(1011, "heartbeat timeout")
            self._spawn(self._hand_over(claimant, req, sid, codec.DEAD))

        probe(
            holder,
            self.relay.loop,
            self.relay.config.conflict_probe_timeout,
            alive=lambda: self.bus.reply(claimant, req, codec.ALIVE),
            silent=silent,
        )

    def _surrender(self, sid: str, holder: Binary) -> None:
        phones = self.relay.registry.surrender(sid, holder)
        if phones:
            self.relay.evict_reclaimed(phones)

    async def _hand_over(self, claimant: str, req: int, sid: str, verdict: str) -> None:
        # The key moves to the claimant before it hears the verdict, so a local claim here
        # racing it finds the new owner rather than our stale lease.
        with contextlib.suppress(*FAILURES):
            await self.store.take(sid, self.me, claimant)
        self.bus.reply(claimant, req, verdict)

    # -- phones whose binary is elsewhere -------------------------------------------

    async def _admit(self, phone: Phone) -> None:
        sid = phone.server_id
        try:
            owner, outcome = await self._ask_owner(phone)
        except (*FAILURES, BusDown):
            phone.unavailable(UNAVAILABLE, REASON_UNAVAILABLE)
            return
        finally:
            phone.release()
        if phone.closing:  # the phone left while we asked
            if owner is not None and outcome == Register.OK.value:
                self.bus.send(owner, codec.Gone(sid, phone.conn_id, 0))
            return
        if owner is None or owner == self.me:
            phone.register_local()  # 4404 unless a binary claimed here meanwhile
            return
        if outcome is None:
            phone.unavailable(UNAVAILABLE, REASON_UNAVAILABLE)  # the owner did not answer
            return
        if outcome != Register.OK.value:
            phone.refuse(Register(outcome))
            return
        self.edges.setdefault(owner, {})[phone.conn_id] = phone
        route = self._routes.get(owner)
        if route is None:
            route = self._routes[owner] = _Route(self, owner)
        phone.register_remote(route)

    async def _ask_owner(self, phone: Phone) -> tuple[str | None, Any]:
        """(the id's owner, its admission answer); (us or None, None) to decide here."""
        sid = phone.server_id
        if not self.bus.up:
            raise BusDown
        if sid in self._claims:  # a binary is claiming it here right now
            await self._claims.settled(sid, self._decision_time())
            if self.relay.registry.binary(sid) is not None:
                return self.me, None
        owner = await self.store.owner(sid)
        if owner is None or owner == self.me:
            return owner, None
        conn_id = phone.conn_id
        outcome = await self.bus.request(
            owner,
            lambda req: codec.Admit(req, sid, conn_id),
            within=self.relay.config.conflict_probe_timeout,
        )
        return owner, outcome

    def _on_admit(self, edge: str, req: int, sid: str, conn_id: str) -> None:
        if sid in self._claims and self.relay.registry.binary(sid) is None:
            self._spawn(self._admit_after_claim(edge, req, sid, conn_id))
            return
        self._register_proxy(edge, req, sid, conn_id)

    async def _admit_after_claim(self, edge: str, req: int, sid: str, conn_id: str) -> None:
        await self._claims.settled(sid, self._decision_time())
        self._register_proxy(edge, req, sid, conn_id)

    def _verdict_time(self) -> float:
        """How long a remote probe's verdict may take: the probe, plus a little for the bus
        (the owner answers at once when it is done)."""
        probe = self.relay.config.conflict_probe_timeout
        return probe + min(probe, 1.0)

    def _decision_time(self) -> float:
        """How long a claim here can take at most: a remote probe and the takeover."""
        return self._verdict_time() + self.lease / 2

    def _register_proxy(self, edge: str, req: int, sid: str, conn_id: str) -> None:
        relay = self.relay
        proxy = RemotePhone(self, edge, sid, conn_id)
        outcome = relay.registry.register_phone(
            sid, conn_id, proxy, relay.config.max_phones_per_server
        )
        if outcome is Register.OK:
            proxy.binary = relay.registry.binary(sid)
            self.proxies.setdefault(edge, {})[conn_id] = proxy
        self.bus.reply(edge, req, outcome.value)

    def _proxy(self, edge: str, sid: str, conn_id: str) -> RemotePhone | None:
        proxy = self.relay.registry.phone(sid, conn_id)
        if isinstance(proxy, RemotePhone) and proxy.edge == edge:
            return proxy
        return None  # evicted meanwhile: the EVICT is on its way to the edge

    def _on_frame(self, edge: str, sid: str, conn_id: str, envelope: bytes) -> None:
        proxy = self._proxy(edge, sid, conn_id)
        if proxy is None:
            return
        relay = self.relay
        binary = relay.registry.binary(sid)
        if binary is None or not binary.send(envelope, proxy):
            if not proxy.ended:  # frames already on their way fail the same way: say it once
                proxy.ended = True
                relay.log.info(
                    "phone_forwarder_send_failed",
                    server_id=sid,
                    conn_id=conn_id,
                    err="relay: binary connection closed",
                )
                self.bus.send(edge, codec.End(conn_id))
            return
        relay.stats.frames_phone_to_binary += 1

    def _on_gone(self, edge: str, sid: str, conn_id: str, notice_code: int) -> None:
        proxy = self._proxy(edge, sid, conn_id)
        if proxy is not None:
            self._unregister_proxy(proxy, notice_code)

    def _unregister_proxy(self, proxy: RemotePhone, notice_code: int) -> None:
        relay = self.relay
        self.forget_proxy(proxy)
        binary = proxy.binary
        if (
            notice_code
            and not relay.shutting_down
            and binary is not None
            and relay.registry.binary(proxy.server_id) is binary
            and not binary.notify(close_notice(proxy.conn_id, notice_code))
        ):
            relay.log.info(
                "phone_close_notice_send_failed",
                server_id=proxy.server_id,
                conn_id=proxy.conn_id,
                close_code=notice_code,
                err="relay: binary connection closed",
            )
        relay.registry.unregister_phone(proxy.server_id, proxy.conn_id, proxy)
        relay.log.info("phone_unregistered", server_id=proxy.server_id, conn_id=proxy.conn_id)

    def forget_proxy(self, proxy: RemotePhone) -> None:
        _discard(self.proxies, proxy.edge, proxy.conn_id, proxy)

    # -- the bus --------------------------------------------------------------------

    def _on_peer(self, sender: str, incarnation: str) -> None:
        known = self._peers.get(sender)
        if known != incarnation:
            if known is not None:
                self._peer_lost(sender, incarnation)
            self._peers[sender] = incarnation

    def _on_foreign(self, err: str) -> None:
        self.relay.log.warn("cluster_bus_foreign_message", instance_id=self.me, err=err)

    def _on_message(self, sender: str, msg: codec.Message) -> None:
        if isinstance(msg, codec.Frame):
            self._on_frame(sender, msg.server_id, msg.conn_id, msg.envelope)
        elif isinstance(msg, codec.ToPhone):
            self._to_phone(sender, msg)
        elif isinstance(msg, codec.Gone):
            self._on_gone(sender, msg.server_id, msg.conn_id, msg.notice_code)
        elif isinstance(msg, codec.Admit):
            self._on_admit(sender, msg.req, msg.server_id, msg.conn_id)
        elif isinstance(msg, codec.Probe):
            self._on_probe(sender, msg.req, msg.server_id)
        elif isinstance(msg, codec.Bye):
            self._peer_lost(sender, None)

    def _to_phone(self, owner: str, msg: codec.ToPhone) -> None:
        phone = self.edges.get(owner, _NO_PHONES).get(msg.conn_id)
        if phone is None:
            return  # closed meanwhile; its Gone is on its way to the owner
        if isinstance(msg, codec.Deliver):
            phone.deliver(msg.frame)
        elif isinstance(msg, codec.Directive):
            phone.close_directive(msg.frame, msg.close_code)
        elif isinstance(msg, codec.Evict):
            phone.evict(msg.close_code, msg.reason)
        elif isinstance(msg, codec.Pause):
            phone.pause()
        elif isinstance(msg, codec.Resume):
            phone.resume()
        else:
            self.relay.log.info(
                "phone_forwarder_no_binary", server_id=phone.server_id, conn_id=phone.conn_id
            )
            phone.end(1000)

    async def _on_up(self) -> None:
        """(Re)connected: assert our instance key and leases before anything is routed."""
        self._epoch += 1
        self.bus.incarnation = f"{self.process}{self._epoch}"
        try:
            await self.store.keep_alive(self.bus.incarnation, self.process)
        except InstanceIdTaken:
            self.relay.log.error("cluster_instance_id_taken", instance_id=self.me)
            raise
        await self._renew()
        self.relay.log.info("cluster_redis_up", instance_id=self.me)

    def _on_down(self, err: str) -> None:
        """Redis is unreachable. Messages published meanwhile are lost for good, so every
        cross-instance pair ends here, on both sides, with 1013 (try again later)."""
        self.relay.log.warn("cluster_redis_down", instance_id=self.me, err=err)
        for owner in list(self.edges):
            self._orphan(owner, UNAVAILABLE, REASON_UNAVAILABLE)
        for edge in list(self.proxies):
            self._drop_edge(edge, UNAVAILABLE)

    def _orphan(self, owner: str, code: int, reason: str) -> None:
        """Close our phones whose binary is on `owner`."""
        for phone in list(self.edges.pop(owner, {}).values()):
            phone.evict(code, reason)

    def _drop_edge(self, edge: str, notice_code: int) -> None:
        """Forget the proxies for `edge`'s phones; their binaries hear a close notice."""
        for proxy in list(self.proxies.get(edge, {}).values()):
            self._unregister_proxy(proxy, notice_code)

    # -- leases and liveness, every lease/3 ------------------------------------------

    async def _tick_loop(self) -> None:
        period = self.lease / 3
        while True:
            await asyncio.sleep(period)
            if not self.bus.up:
                if self.relay.registry.server_ids():
                    self.stats.lease_renew_failures += 1
                continue
            self.bus.keepalive()
            try:
                await self.store.keep_alive(self.bus.incarnation, self.process)
                await self._renew()
                await self._check_peers()
            except FAILURES as exc:
                self.stats.lease_renew_failures += 1
                self.bus.fail(type(exc).__name__)

    async def _renew(self) -> None:
        registry = self.relay.registry
        for sid in await self.store.renew(registry.server_ids()):
            holder = registry.binary(sid)
            if holder is None:
                continue
            # Another instance holds the id now (we were cut off past our lease): it wins.
            self._surrender(sid, holder)
            holder.close(1011, "heartbeat timeout")

    async def _check_peers(self) -> None:
        peers = list(set(self.edges) | set(self.proxies))
        if not peers:
            return
        for peer, incarnation in (await self.store.incarnations(peers)).items():
            if incarnation is None:
                self._peer_lost(peer, None)
            else:
                self._on_peer(peer, incarnation)

    def _peer_lost(self, peer: str, incarnation: str | None) -> None:
        """`peer` is gone (incarnation None: its key lapsed, or it said BYE) or lost Redis
        for a while (a new epoch of the same process): every pair across us ends."""
        known = self._peers.pop(peer, None)
        if incarnation is not None:
            self._peers[peer] = incarnation
        same_process = (
            known is not None
            and incarnation is not None
            and known.rsplit(".", 1)[0] == incarnation.rsplit(".", 1)[0]
        )
        self.relay.log.warn("cluster_peer_gone", instance_id=peer)
        if same_process:  # it was cut off from Redis: what it lost, it lost as we would
            self._orphan(peer, UNAVAILABLE, REASON_UNAVAILABLE)
            self._drop_edge(peer, UNAVAILABLE)
        else:
            self._orphan(peer, 1011, REASON_OWNER_GONE)
            self._drop_edge(peer, 1001)

    async def _release(self, server_ids: list[str]) -> None:
        with contextlib.suppress(*FAILURES):
            await self.store.release(
                [sid for sid in server_ids if self.relay.registry.binary(sid) is None]
            )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _discard(by_instance: dict[str, dict[str, _T]], instance: str, conn_id: str, item: _T) -> None:
    """Remove `item` from its instance's table if it is still there; drop an emptied table."""
    table = by_instance.get(instance)
    if table is not None and table.get(conn_id) is item:
        del table[conn_id]
        if not table:
            del by_instance[instance]
