"""Leases and peer liveness, every lease/3.

Owns: the ticker that renews this instance's key and its leases, keeps the bus subscription
honest (`Bus.keepalive`), and checks the peers it shares pairs with; what a lost lease costs
(the id's holder here closed 1011, its phones 4404) and what a lost peer costs (every pair with
it ends: 1011 `server owner gone` when the peer is gone, 1013 when it only lost Redis for a
while).
Must never: end a pair with a peer that is still the same incarnation.
"""

from __future__ import annotations

import asyncio

from pyrycode_relay.cluster.bus import FAILURES
from pyrycode_relay.cluster.claims import Claims
from pyrycode_relay.cluster.context import (
    REASON_OWNER_GONE,
    REASON_UNAVAILABLE,
    UNAVAILABLE,
    ClusterContext,
)
from pyrycode_relay.cluster.pairs import Pairs


class Liveness:
    """Concurrency: the loop's thread; one ticker task (`run`), and `on_peer` called by the
    bus before any message of a batch."""

    def __init__(self, ctx: ClusterContext, claims: Claims, pairs: Pairs, process: str) -> None:
        self._ctx = ctx
        self._claims = claims
        self._pairs = pairs
        self._process = process
        self._peers: dict[str, str] = {}  # instance → incarnation last heard from it
        self.lease_renew_failures = 0

    async def run(self) -> None:
        ctx = self._ctx
        bus = ctx.bus
        period = ctx.lease / 3
        while True:
            await asyncio.sleep(period)
            if not bus.up:
                if ctx.relay.registry.server_ids():
                    self.lease_renew_failures += 1
                continue
            bus.keepalive()
            try:
                await ctx.store.keep_alive(bus.incarnation, self._process)
                await self.renew()
                await self._check_peers()
            except FAILURES as exc:
                self.lease_renew_failures += 1
                bus.fail(type(exc).__name__)

    async def renew(self) -> None:
        registry = self._ctx.relay.registry
        for sid in await self._ctx.store.renew(registry.server_ids()):
            holder = registry.binary(sid)
            if holder is None:
                continue
            # Another instance holds the id now (we were cut off past our lease): it wins.
            self._claims.surrender(sid, holder)
            holder.close(1011, "heartbeat timeout")

    async def _check_peers(self) -> None:
        peers = list(self._pairs.peers())
        if not peers:
            return
        for peer, incarnation in (await self._ctx.store.incarnations(peers)).items():
            if incarnation is None:
                self.peer_lost(peer, None)
            else:
                self.on_peer(peer, incarnation)

    def on_peer(self, sender: str, incarnation: str) -> None:
        known = self._peers.get(sender)
        if known != incarnation:
            if known is not None:
                self.peer_lost(sender, incarnation)
            self._peers[sender] = incarnation

    def peer_lost(self, peer: str, incarnation: str | None) -> None:
        """`peer` is gone (incarnation None: its key lapsed, or it said Bye) or lost Redis
        for a while (a new epoch of the same process): every pair across us ends."""
        known = self._peers.pop(peer, None)
        if incarnation is not None:
            self._peers[peer] = incarnation
        same_process = (
            known is not None
            and incarnation is not None
            and known.rsplit(".", 1)[0] == incarnation.rsplit(".", 1)[0]
        )
        self._ctx.relay.log.warn("cluster_peer_gone", instance_id=peer)
        pairs = self._pairs
        if same_process:  # it was cut off from Redis: what it lost, it lost as we would
            pairs.orphan(peer, UNAVAILABLE, REASON_UNAVAILABLE)
            pairs.drop_edge(peer, UNAVAILABLE)
        else:
            pairs.orphan(peer, 1011, REASON_OWNER_GONE)
            pairs.drop_edge(peer, 1001)
