"""Pairs across instances: a phone here whose binary is on another instance, and the other way.

Owns: admitting a phone whose binary is elsewhere (the owner applies 4404/4429 and answers),
both ends of such a pair — on the phone's instance (the edge) the `_Route` to its owner, on
the owner the `RemotePhone` proxy in the registry — the bus messages that carry frames,
directives, evictions, pauses and ends between them, and ending every pair with a peer at once
(an outage, a peer gone).
Must never: handle a pair whose binary and phone share this instance (the sessions do, on
the local registry), or wait on Redis for a frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeVar

from pyrycode_relay.cluster import codec
from pyrycode_relay.cluster.bus import FAILURES, BusDown
from pyrycode_relay.cluster.claims import Claims
from pyrycode_relay.cluster.context import REASON_UNAVAILABLE, UNAVAILABLE, ClusterContext
from pyrycode_relay.core.registry import Register
from pyrycode_relay.endpoints.roles import ERR_BINARY_GONE

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.roles import Binary, Phone

_T = TypeVar("_T")
_NO_PHONES: Final[dict[str, Phone]] = {}


class RemotePhone:
    """In the owner's registry: a phone whose WebSocket is on instance `edge`. What the
    binary's session does to it becomes a bus message to that instance."""

    __slots__ = ("binary", "conn_id", "edge", "ended", "pairs", "paused", "server_id")

    def __init__(self, pairs: Pairs, edge: str, server_id: str, conn_id: str) -> None:
        self.pairs = pairs
        self.edge = edge
        self.server_id = server_id
        self.conn_id = conn_id
        self.binary: Binary | None = None  # the holder when it was admitted
        self.ended = False  # an End is on its way: later frames need no second one
        self.paused = False  # a Pause is in force at the edge

    def deliver(self, frame: bytes) -> None:
        self.pairs.send(self.edge, codec.Deliver(self.conn_id, frame))

    def close_directive(self, frame: bytes | None, close_code: int) -> None:
        self.pairs.send(self.edge, codec.Directive(self.conn_id, frame, close_code))

    def evict(self, code: int, reason: str) -> None:
        # Called after the registry let go of us (reclaim, takeover, expiry).
        self.pairs.forget_proxy(self)
        self.pairs.send(self.edge, codec.Evict(self.conn_id, code, reason))

    def pause(self) -> bool:
        """The binary is congested: the edge stops reading the phone, as it would here.
        Frames already on the bus still arrive (bounded by the bus queue limit)."""
        if self.paused:
            return False  # already in the binary's blocked list
        self.paused = True
        self.pairs.send(self.edge, codec.Pause(self.conn_id))
        return True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.pairs.send(self.edge, codec.Resume(self.conn_id))


class _Route:
    """On the phone's instance: the way to its binary's owner."""

    __slots__ = ("owner", "pairs")

    def __init__(self, pairs: Pairs, owner: str) -> None:
        self.pairs = pairs
        self.owner = owner

    def forward(self, phone: Phone, envelope: bytes) -> bool:
        return self.pairs.send(self.owner, codec.Frame(phone.server_id, phone.conn_id, envelope))

    def closed(self, phone: Phone, notice_code: int) -> None:
        pairs = self.pairs
        _discard(pairs.edges, self.owner, phone.conn_id, phone)
        pairs.send(self.owner, codec.Gone(phone.server_id, phone.conn_id, notice_code))


class Pairs:
    """Concurrency: the loop's thread. An admission asking an owner runs as a task of the
    context's with the phone held; bus messages arrive as synchronous calls from the
    placement's dispatch."""

    def __init__(self, ctx: ClusterContext, claims: Claims) -> None:
        self._ctx = ctx
        self._claims = claims
        # edge side: owner instance → our phones whose binary it holds
        self.edges: dict[str, dict[str, Phone]] = {}
        # owner side: edge instance → proxies in our registry for its phones
        self.proxies: dict[str, dict[str, RemotePhone]] = {}
        self._routes: dict[str, _Route] = {}

    def send(self, dest: str, message: codec.Message) -> bool:
        return self._ctx.bus.send(dest, message)

    def peers(self) -> set[str]:
        """Every instance we share a pair with."""
        return set(self.edges) | set(self.proxies)

    def remote_phones(self) -> int:
        """Phones here whose binary is elsewhere."""
        return sum(len(p) for p in self.edges.values())

    def proxied_phones(self) -> int:
        """Phones elsewhere in our registry (they are counted where their socket is)."""
        return sum(len(p) for p in self.proxies.values())

    # -- edge: a phone here, its binary elsewhere ----------------------------------------

    def admit(self, phone: Phone) -> None:
        phone.hold()  # early frames wait for the owner's answer
        self._ctx.spawn(self._admit(phone))

    async def _admit(self, phone: Phone) -> None:
        ctx = self._ctx
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
                self.send(owner, codec.Gone(sid, phone.conn_id, 0))
            return
        if owner is None or owner == ctx.me:
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

    async def _ask_owner(self, phone: Phone) -> tuple[str | None, str | None]:
        """(the id's owner, its admission answer); (us or None, None) to decide here."""
        ctx = self._ctx
        sid = phone.server_id
        if not ctx.bus.up:
            raise BusDown
        if self._claims.in_flight(sid):  # a binary is claiming it here right now
            await self._claims.settled(sid)
            if ctx.relay.registry.binary(sid) is not None:
                return ctx.me, None
        owner = await ctx.store.owner(sid)
        if owner is None or owner == ctx.me:
            return owner, None
        conn_id = phone.conn_id
        outcome = await ctx.bus.request(
            owner,
            lambda req: codec.Admit(req, sid, conn_id),
            within=ctx.relay.config.conflict_probe_timeout,
        )
        return owner, outcome

    def to_phone(self, owner: str, msg: codec.ToPhone) -> None:
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
            self._ctx.relay.log.info(
                "phone_forwarder_no_binary", server_id=phone.server_id, conn_id=phone.conn_id
            )
            phone.end(1000)

    def orphan(self, owner: str, code: int, reason: str) -> None:
        """Close our phones whose binary is on `owner`."""
        for phone in list(self.edges.pop(owner, {}).values()):
            phone.evict(code, reason)

    # -- owner: the binary here, a phone elsewhere ------------------------------------

    def on_admit(self, edge: str, req: int, sid: str, conn_id: str) -> None:
        if self._claims.in_flight(sid) and self._ctx.relay.registry.binary(sid) is None:
            self._ctx.spawn(self._admit_after_claim(edge, req, sid, conn_id))
            return
        self._register_proxy(edge, req, sid, conn_id)

    async def _admit_after_claim(self, edge: str, req: int, sid: str, conn_id: str) -> None:
        await self._claims.settled(sid)
        self._register_proxy(edge, req, sid, conn_id)

    def _register_proxy(self, edge: str, req: int, sid: str, conn_id: str) -> None:
        relay = self._ctx.relay
        proxy = RemotePhone(self, edge, sid, conn_id)
        outcome = relay.registry.register_phone(
            sid, conn_id, proxy, relay.config.max_phones_per_server
        )
        if outcome is Register.OK:
            proxy.binary = relay.registry.binary(sid)
            self.proxies.setdefault(edge, {})[conn_id] = proxy
        self._ctx.bus.reply(edge, req, outcome.value)

    def _proxy(self, edge: str, sid: str, conn_id: str) -> RemotePhone | None:
        proxy = self._ctx.relay.registry.phone(sid, conn_id)
        if isinstance(proxy, RemotePhone) and proxy.edge == edge:
            return proxy
        return None  # evicted meanwhile: the Evict is on its way to the edge

    def on_frame(self, edge: str, sid: str, conn_id: str, envelope: bytes) -> None:
        proxy = self._proxy(edge, sid, conn_id)
        if proxy is None:
            return
        relay = self._ctx.relay
        if not relay.to_binary(sid, envelope, proxy) and not proxy.ended:
            # Frames already on their way fail the same way: the edge is told once.
            proxy.ended = True
            relay.log.info(
                "phone_forwarder_send_failed", server_id=sid, conn_id=conn_id, err=ERR_BINARY_GONE
            )
            self.send(edge, codec.End(conn_id))

    def on_gone(self, edge: str, sid: str, conn_id: str, notice_code: int) -> None:
        proxy = self._proxy(edge, sid, conn_id)
        if proxy is not None:
            self._unregister_proxy(proxy, notice_code)

    def _unregister_proxy(self, proxy: RemotePhone, notice_code: int) -> None:
        self.forget_proxy(proxy)
        self._ctx.relay.phone_gone(proxy.server_id, proxy, proxy.binary, notice_code)

    def forget_proxy(self, proxy: RemotePhone) -> None:
        _discard(self.proxies, proxy.edge, proxy.conn_id, proxy)

    def drop_edge(self, edge: str, notice_code: int) -> None:
        """Forget the proxies for `edge`'s phones; their binaries hear a close notice."""
        for proxy in list(self.proxies.get(edge, {}).values()):
            self._unregister_proxy(proxy, notice_code)

    def end_all(self, code: int, reason: str, notice_code: int) -> None:
        """Every pair with every peer ends (this instance lost its bus)."""
        for owner in list(self.edges):
            self.orphan(owner, code, reason)
        for edge in list(self.proxies):
            self.drop_edge(edge, notice_code)


def _discard(by_instance: dict[str, dict[str, _T]], instance: str, conn_id: str, item: _T) -> None:
    """Remove `item` from its instance's table if it is still there; drop an emptied table."""
    table = by_instance.get(instance)
    if table is not None and table.get(conn_id) is item:
        del table[conn_id]
        if not table:
            del by_instance[instance]
