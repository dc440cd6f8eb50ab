"""Claims across instances: who holds a server-id when a binary asks for it.

Owns: a binary's claim in cluster mode — the free-id acquire before its 101, the conflict
probe an owner elsewhere runs on our behalf (4409 if its binary is alive, a compare-and-set
takeover if silent, the id back if in grace), the owner's side of that probe, surrendering an
id another instance now holds, and the claims in flight an admission must wait for.
Must never: touch a claim of an id held on this instance (the local registry decides those)
or leave an id leased to us that no binary here holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyrycode_relay.cluster import codec
from pyrycode_relay.cluster.bus import FAILURES, BusDown
from pyrycode_relay.cluster.context import REASON_UNAVAILABLE, UNAVAILABLE, ClusterContext
from pyrycode_relay.transport.timers import probe

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.roles import Binary


class _InFlight:
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


class Claims:
    """Concurrency: the loop's thread; a claim that needs Redis or a peer runs as a task of
    the context's, and the binary is held (nothing read) until it is decided."""

    def __init__(self, ctx: ClusterContext) -> None:
        self._ctx = ctx
        self._in_flight = _InFlight()
        # binaries between their id lookup and their claim: the owner found (None: failed)
        self._acquired: dict[Binary, str | None] = {}

    # -- this instance's claimants ---------------------------------------------------

    def before_accept(self, binary: Binary, accept: Callable[[], None]) -> None:
        ctx = self._ctx
        if ctx.relay.registry.binary(binary.server_id) is not None or not ctx.bus.up:
            accept()  # held here already, or Redis is down (the claim then says 1013)
            return
        binary.hold()  # nothing is read until the 101
        self._in_flight.begin(binary.server_id)
        ctx.spawn(self._acquire(binary, accept))

    async def _acquire(self, binary: Binary, accept: Callable[[], None]) -> None:
        ctx = self._ctx
        sid = binary.server_id
        owner: str | None
        try:
            owner = await ctx.store.acquire(sid)
        except FAILURES:
            owner = None
        try:
            if binary.closing:  # the client left before its 101
                if owner == ctx.me:
                    await self.release([sid])
                return
            binary.release()
            self._acquired[binary] = owner
            accept()  # the 101, then `claim` at once
        finally:
            self._in_flight.end(sid)

    def claim(self, binary: Binary) -> None:
        ctx = self._ctx
        owner = self._acquired.pop(binary, None)
        if ctx.relay.registry.binary(binary.server_id) is not None or owner == ctx.me:
            binary.claim_local()  # held here (live or in grace), or the id was free
            return
        if owner is None:  # Redis failed (or was down) when the id was looked up
            binary.refuse(UNAVAILABLE, REASON_UNAVAILABLE)
            return
        binary.hold()  # until decided, nothing is read
        self._in_flight.begin(binary.server_id)
        ctx.spawn(self._claim(binary, owner))

    async def _claim(self, binary: Binary, owner: str) -> None:
        try:
            await self._claim_from(binary, owner)
        finally:
            self._in_flight.end(binary.server_id)

    async def _claim_from(self, binary: Binary, owner: str) -> None:
        """`owner` (another instance) holds the lease: have it probe its binary."""
        ctx = self._ctx
        sid = binary.server_id
        try:
            # The owner pings its binary for up to --conflict-probe-timeout; silence from
            # the owner itself (killed, partitioned) a little longer is a failed probe too.
            incarnation = (await ctx.store.incarnations([owner]))[owner]
            if incarnation is None:
                verdict = None  # the owner's process is gone: nobody to probe
            elif not codec.speaks_our_format(incarnation):
                # A release we cannot talk to (a roll across a bus format change): its
                # silence would read as a dead binary and take a live one over. Come back
                # later; once that release is drained, its keys are gone.
                binary.refuse(UNAVAILABLE, REASON_UNAVAILABLE)
                return
            else:
                verdict = await ctx.bus.request(
                    owner, lambda req: codec.Probe(req, sid), within=self.verdict_time()
                )
            if verdict == codec.ALIVE:
                binary.conflict()
                return
            if not await ctx.store.take(sid, owner):
                binary.conflict()  # another claimant won the race
                return
        except (*FAILURES, BusDown):
            binary.refuse(UNAVAILABLE, REASON_UNAVAILABLE)
            return
        finally:
            binary.release()
        if binary.closing:
            if ctx.relay.registry.binary(sid) is None:
                ctx.spawn(self.release([sid]))  # the claimant left: do not sit on the id
            return
        if verdict != codec.FREE:
            binary.took_over()
        binary.claim_local()

    # -- claimants elsewhere ---------------------------------------------------------

    def on_probe(self, claimant: str, req: int, sid: str) -> None:
        """A claimant elsewhere found our lease on `sid`: is our holder alive?"""
        ctx = self._ctx
        registry = ctx.relay.registry
        holder = registry.binary(sid)
        if holder is None:
            ctx.spawn(self._hand_over(claimant, req, sid, codec.FREE))
            return
        if registry.in_grace(sid):
            self.surrender(sid, holder)
            ctx.spawn(self._hand_over(claimant, req, sid, codec.FREE))
            return

        def silent() -> None:
            if registry.binary(sid) is not holder:
                ctx.bus.reply(claimant, req, codec.ALIVE)  # a newer holder: let it keep the id
                return
            self.surrender(sid, holder)
            holder.close(1011, "heartbeat timeout")
            ctx.spawn(self._hand_over(claimant, req, sid, codec.DEAD))

        probe(
            holder,
            ctx.relay.loop,
            ctx.relay.config.conflict_probe_timeout,
            alive=lambda: ctx.bus.reply(claimant, req, codec.ALIVE),
            silent=silent,
        )

    async def _hand_over(self, claimant: str, req: int, sid: str, verdict: str) -> None:
        # The key moves to the claimant before it hears the verdict, so a local claim here
        # racing it finds the new owner rather than our stale lease.
        ctx = self._ctx
        with contextlib.suppress(*FAILURES):
            await ctx.store.take(sid, ctx.me, claimant)
        ctx.bus.reply(claimant, req, verdict)

    # -- shared with admissions and leases -------------------------------------------

    def surrender(self, sid: str, holder: Binary) -> None:
        """Another instance holds `sid` now: its phones here go (4404), the holder stays
        for the caller to close."""
        relay = self._ctx.relay
        phones = relay.registry.surrender(sid, holder)
        if phones:
            relay.evict_reclaimed(phones)

    async def release(self, server_ids: list[str]) -> None:
        """Hand back the leases of ids no binary here holds (any longer)."""
        registry = self._ctx.relay.registry
        with contextlib.suppress(*FAILURES):
            await self._ctx.store.release([s for s in server_ids if registry.binary(s) is None])

    def in_flight(self, server_id: str) -> bool:
        return server_id in self._in_flight

    async def settled(self, server_id: str) -> None:
        """Until a claim of `server_id` in flight here is decided (bounded)."""
        await self._in_flight.settled(server_id, self.decision_time())

    def verdict_time(self) -> float:
        """How long a remote probe's verdict may take: the probe, plus a little for the bus
        (the owner answers at once when it is done)."""
        timeout = self._ctx.relay.config.conflict_probe_timeout
        return timeout + min(timeout, 1.0)

    def decision_time(self) -> float:
        """How long a claim here can take at most: a remote probe and the takeover."""
        return self.verdict_time() + self._ctx.lease / 2
