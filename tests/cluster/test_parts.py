"""The cluster's parts in-process: the owner's side of a cross-instance pair (Pairs), the
owner's answer to a claimant's probe (Claims) and what a lost peer costs (Liveness), on a
real Relay with fake connections and a fake bus (no Redis, no process). The e2e cluster
suite holds the same behaviour across real processes on a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from pyrycode_relay.cluster import codec
from pyrycode_relay.cluster.bus import Bus
from pyrycode_relay.cluster.claims import Claims
from pyrycode_relay.cluster.context import ClusterContext
from pyrycode_relay.cluster.liveness import Liveness
from pyrycode_relay.cluster.pairs import Pairs
from pyrycode_relay.cluster.store import OwnershipStore
from pyrycode_relay.endpoints.relay import Relay
from tests.fakes import FakeConn, binary, events, make_relay, phone


class FakeBus:
    up = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, codec.Message]] = []

    def send(self, dest: str, message: codec.Message) -> bool:
        self.sent.append((dest, message))
        return True

    def reply(self, dest: str, req: int, value: str) -> None:
        self.send(dest, codec.Reply(req, value))


class FakeStore:
    def __init__(self) -> None:
        self.taken: list[tuple[str, str, str | None]] = []

    async def take(self, sid: str, owner: str, to: str | None = None) -> bool:
        self.taken.append((sid, owner, to))
        return True


def cluster(relay: Relay) -> tuple[FakeBus, FakeStore, Claims, Pairs, Liveness]:
    bus, store = FakeBus(), FakeStore()
    ctx = ClusterContext(relay, cast(OwnershipStore, store), cast(Bus, bus), "owner", 1.0)
    claims = Claims(ctx)
    pairs = Pairs(ctx, claims)
    return bus, store, claims, pairs, Liveness(ctx, claims, pairs, "b1-aaaa.")


def to(bus: FakeBus, dest: str) -> list[Any]:
    return [m for d, m in bus.sent if d == dest]


async def test_the_owner_admits_a_remote_phone_and_carries_its_pair() -> None:
    relay, _ = make_relay("--max-phones-per-server=1")
    bus, _, _, pairs, _ = cluster(relay)
    b, b_conn = binary(relay)
    pairs.on_admit("edge", 7, "s1", "client-s1-0000000a")
    pairs.on_admit("edge", 8, "s1", "client-s1-0000000b")  # over the cap, counted everywhere
    assert to(bus, "edge") == [codec.Reply(7, "ok"), codec.Reply(8, "at_cap")]

    pairs.on_frame("edge", "s1", "client-s1-0000000a", b'{"conn_id":"x","frame":1}')
    assert b_conn.sent == [b'{"conn_id":"x","frame":1}']
    b.on_message(b'{"conn_id":"client-s1-0000000a","frame":{"down":1}}')
    b_conn.write_paused = True
    pairs.on_frame("edge", "s1", "client-s1-0000000a", b"{}")
    pairs.on_frame("edge", "s1", "client-s1-0000000a", b"{}")  # paused once, not twice
    b_conn.write_paused = False
    b.on_writable()
    assert to(bus, "edge")[2:] == [
        codec.Deliver("client-s1-0000000a", b'{"down":1}'),
        codec.Pause("client-s1-0000000a"),
        codec.Resume("client-s1-0000000a"),
    ]


async def test_frames_for_a_binary_that_left_end_the_remote_phone_once() -> None:
    relay, out = make_relay()
    bus, _, _, pairs, _ = cluster(relay)
    _, b_conn = binary(relay)
    pairs.on_admit("edge", 1, "s1", "client-s1-0000000a")
    b_conn.close(1000)  # into grace: no binary to send to
    for _ in range(3):
        pairs.on_frame("edge", "s1", "client-s1-0000000a", b"{}")
    assert to(bus, "edge")[1:] == [codec.End("client-s1-0000000a")]
    assert events(out).count("phone_forwarder_send_failed") == 1


async def test_a_remote_phone_gone_is_announced_to_its_binary_and_unregistered() -> None:
    relay, _ = make_relay()
    _, _, _, pairs, _ = cluster(relay)
    _, b_conn = binary(relay)
    pairs.on_admit("edge", 1, "s1", "client-s1-0000000a")
    pairs.on_gone("edge", "s1", "client-s1-0000000a", 1001)
    assert b_conn.messages() == [{"conn_id": "client-s1-0000000a", "close_code": 1001}]
    assert relay.registry.phone("s1", "client-s1-0000000a") is None
    assert pairs.proxies == {}


async def test_the_owner_answers_a_probe_alive_or_hands_a_silent_binary_over() -> None:
    relay, _ = make_relay("--conflict-probe-timeout=10ms")
    bus, store, claims, _, _ = cluster(relay)
    _, b_conn = binary(relay)
    claims.on_probe("claimant", 3, "s1")
    b_conn.pings.pop()()
    assert to(bus, "claimant") == [codec.Reply(3, codec.ALIVE)]

    claims.on_probe("claimant", 4, "s1")
    # The loop runs timers in deadline order: the probe's (10 ms) before this sleep's end.
    await asyncio.sleep(0.05)
    assert b_conn.closed == (1011, "heartbeat timeout")
    assert relay.registry.binary("s1") is None
    assert store.taken == [("s1", "owner", "claimant")]
    assert to(bus, "claimant")[1:] == [codec.Reply(4, codec.DEAD)]


async def test_a_peer_gone_or_only_cut_off_ends_every_pair_with_it() -> None:
    relay, _ = make_relay()
    _, _, _, pairs, liveness = cluster(relay)
    _, b_conn = binary(relay)

    def pair_up(conn_id: str) -> FakeConn:
        # a phone of ours whose binary is on "peer" (registered there), and a phone of
        # "peer"'s on our binary
        p, p_conn = phone(relay)
        pairs.edges.setdefault("peer", {})[conn_id] = p
        pairs.on_admit("peer", 1, "s1", conn_id)
        return p_conn

    liveness.on_peer("peer", "b1-bbbb.1")
    p_conn = pair_up("client-s1-0000000a")
    liveness.on_peer("peer", "b1-bbbb.2")  # the same process, a new epoch: it lost Redis
    assert p_conn.closed == (1013, "cluster unavailable")
    assert {"conn_id": "client-s1-0000000a", "close_code": 1013} in b_conn.messages()

    p_conn = pair_up("client-s1-0000000b")
    liveness.peer_lost("peer", None)  # its key lapsed, or it said Bye
    assert p_conn.closed == (1011, "server owner gone")
    assert b_conn.messages()[-1] == {"conn_id": "client-s1-0000000b", "close_code": 1001}
    assert pairs.peers() == set()
