"""Cluster mode behind the real HAProxy and nginx, each run from its deploy/ file with only
the addresses and ports changed (tools/bench/balancer.py): three instances on one Redis,
30 server-ids, each a binary and two phones dialled through the balancer.

- Hashing `X-Pyrycode-Server` puts every binary and its phones on one instance: no phone is
  remote anywhere, and frames both ways leave the bus counters where they were.
- A client that dials an instance directly (a split pair) still works, through the bus.
- SIGKILL of an instance: its binaries and phones reconnect through the balancer, land
  together on the remaining instances (local again), and every pair works, still off the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from pyrycode_relay.tools.bench import balancer
from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.spawn import Child
from tests.e2e.clusterharness import Cluster, redis_server, start_cluster
from tests.e2e.harness import Relay, binary, phone, recv_json, wait_metric

IDS = 30
PHONES = 2  # per server-id
PUBLISHED = 'pyrycode_relay_cluster_bus_messages_total{direction="publish"}'
FORWARDED = "pyrycode_relay_frames_forwarded_total{"
REMOTE_PHONES = "pyrycode_relay_cluster_remote_phones"
# HAProxy takes a dead instance out after two failed health checks 1 s apart; until then a
# connection to it is refused (503). nginx retries the next instance at once.
RECONNECT_DEADLINE = 10.0


@dataclass
class Front:
    """The balancer as the clients see it."""

    port: int
    clients: list[ClientConnection] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@dataclass
class Pair:
    server_id: str
    binary: ClientConnection
    phones: list[ClientConnection]


@pytest.fixture(params=balancer.KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if balancer.program(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing; scripts/test.sh must install it")
        pytest.skip(f"{name} not installed (scripts/test.sh installs it)")
    return name


@contextlib.asynccontextmanager
async def balanced_cluster(kind: str) -> AsyncIterator[tuple[Cluster, Front, Child]]:
    """Redis, three instances (no per-IP rate limit: every client comes from 127.0.0.1)
    and the balancer in front of them; every client closed at the end."""
    async with (
        redis_server() as redis,
        start_cluster(redis, 3, "--rate-limit-burst=0") as cluster,
    ):
        with tempfile.TemporaryDirectory(prefix="relay-balancer-") as workdir:
            front = Front(free_port())
            ports = [relay.port for relay in cluster.relays]
            async with balancer.started_async(kind, front.port, ports, Path(workdir)) as lb:
                try:
                    yield cluster, front, lb
                except BaseException:
                    print(f"----- {kind} log -----\n{lb.log_text()}")
                    raise
                finally:
                    for ws in front.clients:
                        ws.transport.abort()


async def dial_binary(front: Front, server_id: str) -> ClientConnection:
    """A binary through the balancer, retrying while the balancer answers 502/503 (it has
    not yet taken a dead instance out), within a bounded deadline."""
    async with asyncio.timeout(RECONNECT_DEADLINE):
        while True:
            try:
                return await binary(front, server_id)
            except websockets.InvalidStatus as exc:
                if exc.response.status_code not in (502, 503):
                    raise
            await asyncio.sleep(0.05)


async def open_pair(front: Front, server_id: str) -> Pair:
    b = await dial_binary(front, server_id)
    phones = [await phone(front, server_id) for _ in range(PHONES)]
    return Pair(server_id, b, phones)


async def round_trip(pair: Pair) -> None:
    """Each phone's frame reaches the binary, and the binary's answer reaches that phone."""
    for k, ph in enumerate(pair.phones):
        await ph.send(f'{{"ping":{k}}}')
        env = await recv_json(pair.binary)
        assert env["frame"] == {"ping": k}, env
        await pair.binary.send(f'{{"conn_id":"{env["conn_id"]}","frame":{{"pong":{k}}}}}')
        assert await recv_json(ph) == {"pong": k}


async def bus_and_frames(relays: list[Relay]) -> tuple[float, float]:
    """Bus messages published and frames forwarded, summed over `relays`."""
    published = forwarded = 0.0
    for relay in relays:
        for name, value in (await relay.metrics()).items():
            if name == PUBLISHED:
                published += value
            elif name.startswith(FORWARDED):
                forwarded += value
    return published, forwarded


async def assert_all_local(cluster: Cluster, relays: list[Relay], pairs: list[Pair]) -> None:
    """Every server-id is owned by one of `relays`, which holds its binary and all its
    phones; no instance has a remote phone; frames of every pair leave the bus alone."""
    owners = Counter([await cluster.redis.owner(p.server_id) for p in pairs])
    assert set(owners) <= {cluster.instance_id(r) for r in relays}, owners
    for relay in relays:
        mine = owners[cluster.instance_id(relay)]
        await relay.wait_counts(mine, mine * PHONES)
        assert (await relay.metrics())[REMOTE_PHONES] == 0
    published, forwarded = await bus_and_frames(relays)
    await asyncio.gather(*(round_trip(p) for p in pairs))
    published_after, forwarded_after = await bus_and_frames(relays)
    assert forwarded_after - forwarded == 2 * PHONES * len(pairs)
    assert published_after == published, "frames of a local pair crossed the bus"


async def test_pairs_stay_local_behind_the_balancer_and_land_together_after_a_kill(
    kind: str,
) -> None:
    async with balanced_cluster(kind) as (cluster, front, _):
        pairs = await asyncio.gather(*(open_pair(front, f"lb-{i}") for i in range(IDS)))
        await assert_all_local(cluster, cluster.relays, pairs)

        # A split pair: one more phone of pairs[0], dialled straight to another instance.
        first = pairs[0]
        owner = await cluster.redis.owner(first.server_id)
        elsewhere = next(r for r in cluster.relays if cluster.instance_id(r) != owner)
        direct = Pair(first.server_id, first.binary, [await phone(elsewhere, first.server_id)])
        published, _ = await bus_and_frames(cluster.relays)
        await round_trip(direct)
        assert (await elsewhere.metrics())[REMOTE_PHONES] == 1
        assert (await bus_and_frames(cluster.relays))[0] >= published + 2  # there and back
        await direct.phones[0].close()
        notice = await recv_json(first.binary)  # the close notice crosses back too
        assert notice.keys() == {"conn_id", "close_code"}, notice
        await wait_metric(elsewhere, REMOTE_PHONES, 0)

        # SIGKILL the instance holding the most server-ids.
        owners = {p.server_id: await cluster.redis.owner(p.server_id) for p in pairs}
        victim_id = Counter(owners.values()).most_common(1)[0][0]
        victim = next(r for r in cluster.relays if cluster.instance_id(r) == victim_id)
        survivors = [r for r in cluster.relays if r is not victim]
        moved = [p for p in pairs if owners[p.server_id] == victim_id]
        assert moved
        victim.proc.kill()
        await victim.proc.wait()
        for p in moved:  # the balancer closes the clients of the dead instance
            for ws in (p.binary, *p.phones):
                async with asyncio.timeout(5):
                    await ws.wait_closed()

        # Their reconnects go through the balancer; each binary claims its id afresh (the
        # dead owner's lease lapses), then its phones follow it.
        async def reconnect(p: Pair) -> Pair:
            b = await dial_binary(front, p.server_id)
            async with asyncio.timeout(RECONNECT_DEADLINE):
                while await cluster.redis.owner(p.server_id) in (None, victim_id):
                    await asyncio.sleep(0.02)
            return Pair(p.server_id, b, [await phone(front, p.server_id) for _ in range(PHONES)])

        again = await asyncio.gather(*(reconnect(p) for p in moved))
        kept = [p for p in pairs if owners[p.server_id] != victim_id]
        await assert_all_local(cluster, survivors, [*kept, *again])
