"""Cluster mode over Redis (product spec §5): several relay processes on one real
redis-server act as one relay. Every reference behaviour holds across instances: routing
with exact envelope bytes and per-phone order, close directives and close notices,
4404 / 4429 / 4409, probe and takeover, grace / reclaim / expiry; plus what only a cluster
has: owner death (SIGKILL / SIGTERM), a Redis outage and its recovery, `/healthz`'s
`cluster` field, the cluster metrics and the cluster boot refusals.

Timers: lease 1 s (so an owner's keys lapse within 1 s of its death and peers look every
1/3 s), grace 600 ms and conflict probe 400 ms (harness.FAST_TIMERS).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import signal
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from pyrycode_relay import __version__
from pyrycode_relay.cluster import codec
from pyrycode_relay.tools.bench.ports import free_port
from tests.e2e.clusterharness import (
    INSTANCE_KEY,
    OWNER_KEY,
    Cluster,
    freezing_proxy,
    open_fds,
    redis_server,
    run_relay_bounded,
    start_cluster,
)
from tests.e2e.clusterharness import Redis as RedisServer
from tests.e2e.harness import (
    RawWs,
    Relay,
    assert_silent,
    binary,
    closed_with,
    phone,
    raw_read_close,
    recv,
    start_relay,
    wait_metric,
)

SID = "s1"
LEASE = 1.0  # --cluster-lease in start_cluster
GRACE = 0.6  # --grace-period in FAST_TIMERS
PROBE = 0.4  # --conflict-probe-timeout in FAST_TIMERS
SLACK = 1.0  # scheduling headroom on a loaded CI box

RECLAIMED = (4404, "binary reclaimed server-id")
NO_SERVER = (4404, "no server with that id")
CONFLICT = (4409, "server-id already claimed")
AT_CAP = (4429, "too many phones for server-id")
TAKEN_OVER = (1011, "heartbeat timeout")
OWNER_GONE = (1011, "server owner gone")
UNAVAILABLE = (1013, "cluster unavailable")
SHUTTING_DOWN = (1001, "shutting down")

PUBLISHED = 'pyrycode_relay_cluster_bus_messages_total{direction="publish"}'
RECEIVED = 'pyrycode_relay_cluster_bus_messages_total{direction="receive"}'
REMOTE_PHONES = "pyrycode_relay_cluster_remote_phones"
REDIS_UP = "pyrycode_relay_cluster_redis_up"
RENEW_FAILURES = "pyrycode_relay_cluster_lease_renew_failures_total"
TASKS = "pyrycode_relay_asyncio_tasks"
TAKEOVERS = "pyrycode_relay_takeovers_total"


# -- helpers --------------------------------------------------------------------------


def envelope(conn_id: str, frame: str) -> str:
    """`{"conn_id":…,"frame":<frame>}` with `frame` embedded verbatim (as single instance)."""
    return f'{{"conn_id":"{conn_id}","frame":{frame}}}'


def notice(conn_id: str, code: int) -> str:
    """The exact close-notice text: key order conn_id, close_code; no `frame` key."""
    return f'{{"conn_id":"{conn_id}","close_code":{code}}}'


async def recv_text(ws: ClientConnection, timeout: float = 3.0) -> str:
    msg = await recv(ws, timeout)
    assert isinstance(msg, str), f"expected a text frame, got {msg!r}"
    return msg


def claimed_line(server_id: str) -> str:
    return f"msg=server_claimed server_id={server_id} "


async def wait_claimed(
    c: Cluster, relay: Relay, server_id: str = SID, *, claims: int = 1, timeout: float = 5.0
) -> None:
    """Barrier: `relay` holds `server_id` cluster-wide. The owner key in Redis names its
    instance, and it has logged its `claims`-th claim of the id (so the binary is in its
    registry: the key alone may flip a moment before, e.g. right after a takeover)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await c.wait_owner(server_id, relay, timeout)
    try:
        async with asyncio.timeout(max(deadline - loop.time(), 0.01)):
            while relay.count_log(claimed_line(server_id)) < claims:
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(
            f"{c.instance_id(relay)} logged {relay.count_log(claimed_line(server_id))} "
            f"claims of {server_id!r}, expected {claims}"
        ) from None


async def claim(c: Cluster, relay: Relay, server_id: str = SID) -> ClientConnection:
    """A binary on `relay`, returned once its claim holds cluster-wide, so a phone on any
    instance finds it."""
    claims = relay.count_log(claimed_line(server_id)) + 1
    b = await binary(relay, server_id)
    await wait_claimed(c, relay, server_id, claims=claims)
    return b


async def join(
    relay: Relay, b: ClientConnection, server_id: str = SID, hello: str = '{"hello":1}'
) -> tuple[ClientConnection, str]:
    """A phone on `relay` whose first frame reaches `b` as the next message, byte-exact;
    returns the phone and its conn_id."""
    p = await phone(relay, server_id)
    await p.send(hello)
    raw = await recv_text(b)
    env = json.loads(raw)
    cid = env.get("conn_id")
    assert isinstance(cid, str), raw
    assert re.fullmatch(rf"client-{re.escape(server_id)}-[0-9a-f]{{8}}", cid), cid
    assert raw == envelope(cid, hello)
    return p, cid


async def round_trip(b: ClientConnection, p: ClientConnection, cid: str, tag: str) -> None:
    """One frame each way between `b` and `p`, byte-exact."""
    up = f'{{"up" : "{tag}"}}'
    await p.send(up)
    assert await recv_text(b) == envelope(cid, up)
    down = f'{{"down" :[ "{tag}" ]}}'
    await b.send(envelope(cid, down))
    assert await recv_text(p) == down


async def wait_above(relay: Relay, series: str, floor: float, timeout: float = 5.0) -> float:
    """Poll `/metrics` until `series` exceeds `floor`; its value."""
    value = 0.0
    try:
        async with asyncio.timeout(timeout):
            while (value := (await relay.metrics()).get(series, 0.0)) <= floor:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{series} stayed at {value}, not above {floor}") from None
    return value


async def settled(relay: Relay, series: str) -> float:
    """The lowest of a few consecutive readings of a gauge, to leave out tasks that only
    exist for a moment (a scrape, a periodic lease renewal)."""
    values = []
    for _ in range(5):
        values.append((await relay.metrics())[series])
        await asyncio.sleep(0.02)
    return min(values)


async def wait_fds(relay: Relay, expected: int, timeout: float = 5.0, *, slack: int = 0) -> None:
    """Poll until the relay holds `expected` fds (up to `slack` more)."""
    n = open_fds(relay)
    try:
        async with asyncio.timeout(timeout):
            while not expected <= (n := open_fds(relay)) <= expected + slack:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"relay holds {n} fds, expected {expected}") from None


async def wait_redis_state(relay: Relay, instance_id: str, state: str, timeout: float) -> None:
    """Poll until `/healthz` reports `state` for Redis and the gauge agrees."""
    want = {"instance_id": instance_id, "redis": state}
    seen: Any = None
    try:
        async with asyncio.timeout(timeout):
            while (seen := (await relay.healthz()).get("cluster")) != want:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"/healthz cluster is {seen!r}, expected {want!r}") from None
    await wait_metric(relay, REDIS_UP, 1.0 if state == "up" else 0.0, timeout)


async def raw_data_frames(raw: RawWs, n: int) -> list[bytes]:
    """The next `n` data frames on a raw socket (control frames skipped, none answered)."""
    frames: list[bytes] = []
    while len(frames) < n:
        opcode, payload = await raw.read_frame()
        assert opcode != 0x8, f"closed early: {payload!r}"
        if opcode in (0x1, 0x2):
            frames.append(payload)
    return frames


def healthz_pattern(instance_id: str, binaries: int, phones: int, redis: str) -> re.Pattern[bytes]:
    """The exact `/healthz` body in cluster mode (uptime aside)."""
    head = (
        f'{{"status":"ok","version":{json.dumps(__version__)},'
        f'"connected_binaries":{binaries},"connected_phones":{phones},"uptime_seconds":'
    )
    tail = f',"cluster":{{"instance_id":"{instance_id}","redis":"{redis}"}}}}'
    return re.compile(re.escape(head.encode()) + rb"\d+" + re.escape(tail.encode()))


# -- routing across instances -------------------------------------------------------------


async def test_routes_both_ways_in_order_across_instances() -> None:
    n = 200
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        b = await claim(c, r1)
        p2, cid2 = await join(r2, b)
        p3, cid3 = await join(r3, b)
        assert cid2 != cid3

        def up(tag: str, i: int) -> str:
            return f'{{"from":"{tag}",  "seq":{i}, "t":"ünï ☃ 日本 🚀"}}'

        def down(tag: str, i: int) -> str:
            return f'{{ "to" : "{tag}" ,"seq":{i}, "x":[1, 2]}}'

        async def send_all(p: ClientConnection, tag: str) -> None:
            for i in range(n):
                await p.send(up(tag, i))

        await asyncio.gather(send_all(p2, "p2"), send_all(p3, "p3"))
        got = [await recv_text(b) for _ in range(2 * n)]
        from_p2 = [m for m in got if m.startswith(f'{{"conn_id":"{cid2}",')]
        from_p3 = [m for m in got if m.startswith(f'{{"conn_id":"{cid3}",')]
        assert from_p2 == [envelope(cid2, up("p2", i)) for i in range(n)]
        assert from_p3 == [envelope(cid3, up("p3", i)) for i in range(n)]

        for i in range(n):
            await b.send(envelope(cid2, down("p2", i)))
            await b.send(envelope(cid3, down("p3", i)))

        async def recv_all(p: ClientConnection) -> list[str]:
            return [await recv_text(p) for _ in range(n)]

        got2, got3 = await asyncio.gather(recv_all(p2), recv_all(p3))
        assert got2 == [down("p2", i) for i in range(n)]
        assert got3 == [down("p3", i) for i in range(n)]
        await asyncio.gather(assert_silent(b, 0.2), assert_silent(p2, 0.2), assert_silent(p3, 0.2))
        # each instance counts the WebSockets it holds
        await r1.wait_counts(1, 0)
        await r2.wait_counts(0, 1)
        await r3.wait_counts(0, 1)


@pytest.mark.parametrize("with_frame", [False, True], ids=["no-frame", "frame"])
async def test_close_directive_to_remote_phone(with_frame: bool) -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        b = await claim(c, r1)
        p2, cid2 = await join(r2, b)
        p3, cid3 = await join(r3, b)
        await b.send(envelope(cid2, '{"f":1}'))
        await b.send(envelope(cid2, '{"f":2}'))
        if with_frame:
            await b.send(
                f'{{"conn_id":"{cid2}","frame":{{"type":"error", "f":3}},"close_code":4401}}'
            )
        else:
            await b.send(f'{{"conn_id":"{cid2}","close_code":4401}}')
        await b.send(envelope(cid2, '{"f":4}'))  # after the directive: never delivered
        expected = ['{"f":1}', '{"f":2}'] + (['{"type":"error", "f":3}'] if with_frame else [])
        assert [await recv_text(p2) for _ in expected] == expected
        assert await closed_with(p2) == (4401, "")  # fails if f4 arrives first
        await r2.wait_counts(0, 0)
        await wait_metric(r2, REMOTE_PHONES, 0)
        await assert_silent(b, 0.2)  # no close notice for a binary-requested close
        # the other remote phone is untouched
        await round_trip(b, p3, cid3, "p3")
        await r3.wait_counts(0, 1)


@pytest.mark.parametrize("how", ["1000", "4000", "abort"])
async def test_close_notice_for_remote_phone(how: str) -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        b = await claim(c, r1)
        p2, cid2 = await join(r2, b)
        p3, cid3 = await join(r3, b)
        frames: list[str] = []
        if how == "abort":  # TCP reset, no close frame: 1001
            code = 1001
            p2.transport.abort()
        else:
            code = int(how)
            frames = [f'{{"seq":{i}}}' for i in range(5)]
            for frame in frames:
                await p2.send(frame)
            await p2.close(code=code, reason="bye")
        got = [await recv_text(b) for _ in range(len(frames) + 1)]
        assert got == [envelope(cid2, f) for f in frames] + [notice(cid2, code)]
        await assert_silent(b, 0.2)  # exactly one notice
        await r2.wait_counts(0, 0)
        await wait_metric(r2, REMOTE_PHONES, 0)
        await round_trip(b, p3, cid3, "p3")


# -- admission across instances -----------------------------------------------------------


async def test_unknown_server_id_4404_on_any_instance() -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        p = await phone(r2, SID)  # no instance holds s1
        assert await closed_with(p) == NO_SERVER
        b = await claim(c, r1)
        q = await phone(r3, "s9")  # another id, still held nowhere
        assert await closed_with(q) == NO_SERVER
        await r2.wait_counts(0, 0)
        await r3.wait_counts(0, 0)
        await assert_silent(b, 0.1)


async def test_phone_cap_counts_phones_on_every_instance() -> None:
    async with (
        redis_server() as redis,
        start_cluster(redis, 3, "--max-phones-per-server=2") as c,
    ):
        r1, r2, r3 = c.relays
        b = await claim(c, r1)
        p2, cid2 = await join(r2, b)
        p3, cid3 = await join(r3, b)
        # the cap is full with two phones on two other instances
        over1 = await phone(r1, SID)
        assert await closed_with(over1) == AT_CAP
        over2 = await phone(r2, SID)
        assert await closed_with(over2) == AT_CAP
        await assert_silent(b, 0.1)  # no notice for a phone that was never admitted
        await round_trip(b, p2, cid2, "p2")
        # one remote phone leaves: its slot is free again, on any instance
        await p2.close()
        assert await recv_text(b) == notice(cid2, 1000)
        p4, cid4 = await join(r3, b, hello='{"p4":1}')
        await round_trip(b, p4, cid4, "p4")
        await round_trip(b, p3, cid3, "p3")
        await r2.wait_counts(0, 0)
        await r3.wait_counts(0, 2)


# -- claim conflicts --------------------------------------------------------------------


async def test_duplicate_claim_on_another_instance_4409() -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        b1 = await claim(c, r1)
        p2, cid2 = await join(r2, b1)
        b3 = await binary(r3, SID)  # the incumbent on r1 answers the probe
        assert await closed_with(b3) == CONFLICT
        assert await redis.owner(SID) == "i1"
        await round_trip(b1, p2, cid2, "after-conflict")
        await r3.wait_counts(0, 0)
        await r1.wait_counts(1, 0)
        for r in c.relays:
            assert (await r.metrics())[TAKEOVERS] == 0


async def test_unresponsive_incumbent_taken_over_from_another_instance() -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        b1 = await RawWs.connect(r1, "server", SID)  # never reads, so never pongs
        try:
            await wait_claimed(c, r1)
            p1 = await phone(r1, SID)
            p2 = await phone(r2, SID)
            await p1.send('{"from":"p1"}')
            await p2.send('{"from":"p2"}')
            got = sorted(json.loads(f)["frame"]["from"] for f in await raw_data_frames(b1, 2))
            assert got == ["p1", "p2"]  # both phones are registered with B1
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            b3 = await binary(r3, SID)
            c1, c2 = await asyncio.gather(closed_with(p1), closed_with(p2))
            assert c1 == c2 == RECLAIMED  # the old binary's phones, on every instance
            assert loop.time() - t0 >= PROBE - 0.01, "takeover before --conflict-probe-timeout"
            code, reason, _ = await raw_read_close(b1)
            assert (code, reason) == TAKEN_OVER
            await wait_claimed(c, r3)
            # new phones on both other instances reach B3; B3's first messages are their
            # frames (no close notice for the phones of the binary it displaced)
            p2b, cid2b = await join(r2, b3)
            p1b, cid1b = await join(r1, b3)
            await round_trip(b3, p2b, cid2b, "p2b")
            await round_trip(b3, p1b, cid1b, "p1b")
            await assert_silent(b3, 0.1)
        finally:
            b1.close()


async def test_claim_of_an_id_whose_owner_speaks_another_bus_format_is_refused_1013() -> None:
    """During a roll across a bus format change the two releases cannot hear each other:
    a probe would go unanswered and take the id over even from a live binary. Instance
    keys name their process's bus format, so such a claim is refused 1013 (try again
    later) at once and the id stays put; an owner of our format that stays silent is
    still taken over after the probe."""
    async with redis_server() as redis, start_cluster(redis, 1) as c:
        (r1,) = c.relays
        ghost = "ghost"  # an instance that never answers the bus

        async def plant(process: str) -> None:
            await redis.command("SET", INSTANCE_KEY + ghost, f"{process}0", "PX", "60000")
            await redis.command("SET", OWNER_KEY + SID, ghost, "PX", "60000")

        await plant(codec.process_token(codec.VERSION + 1, "0123456789abcdef"))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        b = await binary(r1, SID)
        assert await closed_with(b, PROBE + SLACK) == UNAVAILABLE
        assert loop.time() - t0 < PROBE, "waited for a probe nobody could answer"
        assert await redis.command("GET", OWNER_KEY + SID) == ghost.encode()

        await plant(codec.process_token(codec.VERSION, "0123456789abcdef"))
        b2 = await binary(r1, SID)
        await wait_claimed(c, r1)  # after the probe went unanswered
        assert b2.close_code is None
        m = await r1.metrics()
        assert m[TAKEOVERS] == 1


# -- grace, reclaim, expiry across instances -----------------------------------------------


@pytest.mark.parametrize("ending", ["reclaim", "expiry", "frame"])
async def test_grace_across_instances(ending: str) -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        loop = asyncio.get_running_loop()
        b1 = await claim(c, r1)
        p2, cid2 = await join(r2, b1)
        p1, _ = await join(r1, b1)
        await b1.close()
        t_closed = loop.time()
        await r1.wait_log("msg=server_released server_id=s1")
        if ending == "reclaim":
            b3 = await binary(r3, SID)  # within grace, on another instance
            c1, c2 = await asyncio.gather(closed_with(p1), closed_with(p2))
            assert c1 == c2 == RECLAIMED
            await wait_claimed(c, r3)
            p2b, cid2b = await join(r2, b3)  # B3's first message: no notice came before
            assert cid2b != cid2
            # the old owner's grace timer has no effect once it would have fired
            quiet = max(t_closed + GRACE + 0.4 - loop.time(), 0.1)
            await asyncio.gather(assert_silent(b3, quiet), assert_silent(p2b, quiet))
            await round_trip(b3, p2b, cid2b, "after-grace")
            await r1.wait_counts(0, 0)
            await r2.wait_counts(0, 1)
            await r3.wait_counts(1, 0)
        elif ending == "expiry":
            p3 = await phone(r3, SID)  # admitted during grace, on a third instance
            closes = await asyncio.gather(
                *(closed_with(p, GRACE + SLACK + 1) for p in (p1, p2, p3))
            )
            assert closes == [(1000, "")] * 3
            assert loop.time() - t_closed >= GRACE - 0.05, "released before the grace period"
            late = await phone(r2, SID)
            assert await closed_with(late) == NO_SERVER
            # the id is free: a new binary claims it on another instance
            b2 = await claim(c, r2)
            p3b, cid3b = await join(r3, b2)
            await round_trip(b2, p3b, cid3b, "fresh")
        else:
            await p2.send('{"during":"grace"}')
            assert await closed_with(p2) == (1000, "")
            t_p2 = loop.time()
            # only that phone: P1 stays until the grace period ends
            assert await closed_with(p1, GRACE + SLACK) == (1000, "")
            assert t_p2 < t_closed + GRACE - 0.05, "P2 was closed by the expiry, not its frame"
            assert loop.time() - t_closed >= GRACE - 0.05
            # the frame sent during grace is delivered nowhere
            b3 = await claim(c, r3)
            await assert_silent(b3, 0.2)
            await r2.wait_counts(0, 0)


# -- owner death -------------------------------------------------------------------------


async def test_owner_sigkill_remote_phones_closed_1011_then_binary_reclaims() -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        b1 = await claim(c, r1)
        p2, _ = await join(r2, b1)
        p3, _ = await join(r3, b1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r1.proc.kill()
        bound = LEASE + LEASE / 3 + SLACK
        c2, c3 = await asyncio.gather(closed_with(p2, bound), closed_with(p3, bound))
        assert c2 == c3 == OWNER_GONE
        assert loop.time() - t0 <= bound
        assert await r1.stop() == -signal.SIGKILL
        await r2.wait_counts(0, 0)
        await r3.wait_counts(0, 0)
        await wait_metric(r2, REMOTE_PHONES, 0)
        # the binary reconnects to another instance and holds the id within the lease
        b3 = await binary(r3, SID)
        await wait_claimed(c, r3, timeout=max(t0 + LEASE + SLACK - loop.time(), 0.1))
        p2b, cid2b = await join(r2, b3)
        p3b, cid3b = await join(r3, b3)
        await round_trip(b3, p2b, cid2b, "p2b")
        await round_trip(b3, p3b, cid3b, "p3b")


async def test_owner_sigkill_binary_reclaims_at_once_elsewhere() -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        b1 = await claim(c, r1)
        p3, _ = await join(r3, b1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r1.proc.kill()
        # the binary reconnects at once; the dead owner cannot answer the probe
        b2 = await binary(r2, SID)
        await wait_claimed(c, r2, timeout=PROBE + SLACK)
        assert loop.time() - t0 <= PROBE + SLACK
        # the dead owner's phone goes, whichever happens first: the takeover (4404) or
        # its edge noticing the owner is gone (1011)
        assert await closed_with(p3, LEASE + LEASE / 3 + SLACK) in (RECLAIMED, OWNER_GONE)
        p3b, cid3b = await join(r3, b2)  # B2's first message: no notice for the old phone
        await round_trip(b2, p3b, cid3b, "p3b")
        await assert_silent(b2, 0.2)
        await r3.wait_counts(0, 1)


async def test_owner_sigterm_remote_phones_closed_promptly_and_id_free_at_once() -> None:
    lease = 5.0  # long: prompt closes cannot come from the lease lapsing
    async with (
        redis_server() as redis,
        start_cluster(redis, 3, "--conflict-probe-timeout=3s", lease="5s") as c,
    ):
        r1, r2, r3 = c.relays
        b1 = await claim(c, r1)
        p2, _ = await join(r2, b1)
        p3, _ = await join(r3, b1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r1.proc.send_signal(signal.SIGTERM)
        bound = lease / 3 + 0.8  # a lapse would take at least 2/3 of the lease (3.3 s)
        cb, c2, c3 = await asyncio.gather(
            closed_with(b1, bound), closed_with(p2, bound), closed_with(p3, bound)
        )
        assert cb == SHUTTING_DOWN
        assert c2[0] == c3[0] == 1011, (c2, c3)
        assert loop.time() - t0 <= bound
        async with asyncio.timeout(5):  # (Relay.stop would signal again: -15 if unlucky)
            assert await r1.proc.wait() == 0
        # the orderly exit removed its keys
        assert await redis.owner(SID) is None
        assert not await redis.instance_live("i1")
        # so the binary gets the id elsewhere at once (no 3 s probe of a gone owner)
        t1 = loop.time()
        b2 = await binary(r2, SID)
        await wait_claimed(c, r2, timeout=1.5)
        assert loop.time() - t1 < 1.5
        p3b, cid3b = await join(r3, b2)
        await round_trip(b2, p3b, cid3b, "p3b")


# -- Redis outage ------------------------------------------------------------------------


async def kill_subscriber(redis: RedisServer, instance_id: str) -> None:
    """Cut one instance's pub/sub connection (Redis stays up for everyone else)."""
    reply = await redis.command("CLIENT", "LIST", "TYPE", "pubsub")
    assert isinstance(reply, bytes), reply
    listing = reply.decode()
    ids = [
        fields["id"]
        for fields in (
            dict(f.split("=", 1) for f in line.split(" ") if "=" in f)
            for line in listing.splitlines()
        )
        if fields.get("name") == f"pyrycode-relay:{instance_id}"
    ]
    assert len(ids) == 1, listing
    assert await redis.command("CLIENT", "KILL", "ID", ids[0]) == 1


@pytest.mark.parametrize("cut", ["edge", "owner"])
async def test_one_instance_losing_its_bus_ends_its_cross_pairs_on_both_sides(cut: str) -> None:
    """Messages published while an instance is off the bus are lost for good, even if it is
    back within a lease. Whichever side was cut, neither half of a pair across it may stay
    open: the phone is closed 1013, its binary gets the 1013 close notice, and the id (and
    the per-server cap) is usable again at once."""
    async with redis_server() as redis, start_cluster(redis, 2, "--max-phones-per-server=1") as c:
        r1, r2 = c.relays
        b = await claim(c, r1)
        p, cid = await join(r2, b)
        await kill_subscriber(redis, "i2" if cut == "edge" else "i1")
        bound = LEASE / 3 + LEASE + SLACK  # one liveness check after the reconnection
        assert await closed_with(p, bound) == UNAVAILABLE
        assert await recv_text(b, bound) == notice(cid, 1013)
        await r2.wait_counts(0, 0)
        await wait_redis_state(r1, "i1", "up", 5)
        await wait_redis_state(r2, "i2", "up", 5)
        p2, cid2 = await join(r2, b, hello='{"again":1}')  # not 4429: the old one is gone
        await round_trip(b, p2, cid2, "after-cut")


async def test_silently_dead_subscription_is_noticed_and_ends_its_pairs() -> None:
    """A NAT or load balancer that drops an idle flow leaves the subscription's connection
    open but deaf: the instance would never hear its peers again while its liveness key
    stays fresh (other connections renew it). A subscription quiet for lease/3 is pinged;
    no answer by the next lease/3 is an outage: the pairs across it end 1013 on both sides
    and the bus comes back on a new connection."""
    async with redis_server() as redis, freezing_proxy(redis) as proxy:
        flags = ("--cluster-lease=1s",)
        async with (
            start_relay(f"--cluster-redis={redis.url}", "--instance-id=i1", *flags) as r1,
            start_relay(f"--cluster-redis={proxy.url}", "--instance-id=i2", *flags) as r2,
        ):
            c = Cluster(redis, [r1, r2], ["i1", "i2"])
            await c.wait_ready()
            b = await claim(c, r1)
            p, cid = await join(r2, b)
            await round_trip(b, p, cid, "before")
            assert proxy.freeze_subscribers() == 1
            # two lease/3 ticks to notice, then one liveness check on i1 after the new epoch
            bound = 3 * LEASE / 3 + LEASE / 3 + SLACK
            assert await closed_with(p, bound) == UNAVAILABLE
            assert await recv_text(b, bound) == notice(cid, 1013)
            assert "subscription silent" in await r2.wait_log("msg=cluster_redis_down", 1)
            await wait_redis_state(r2, "i2", "up", 5)
            p2, cid2 = await join(r2, b, hello='{"again":1}')
            await round_trip(b, p2, cid2, "after")


async def test_congested_binary_pauses_its_phones_on_other_instances() -> None:
    """Back-pressure crosses instances: a binary that stops reading stops its phone on
    another instance from being read (instead of the owner buffering the phone's frames
    until --write-timeout), and reading again resumes it, every frame in order."""
    quiet = ("--write-timeout=10s", "--heartbeat-interval=60s")  # the raw binary never pongs
    async with redis_server() as redis, start_cluster(redis, 2, *quiet) as c:
        r1, r2 = c.relays
        raw = await RawWs.connect(r1, "server", SID)  # reads nothing for now
        await wait_claimed(c, r1)
        p = await phone(r2, SID)
        chunk = json.dumps({"m": "x" * 65_536})
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):
                while True:
                    await p.send(chunk)
                    sent += 1
        # Socket buffers on the way hold a few MB; unpaused, loopback and Redis would have
        # carried well over a hundred in this time.
        assert 3 < sent < 400, sent
        # The binary reads again: the phone is resumed, so its last frame gets through too.
        last = asyncio.create_task(p.send('{"last":1}'))
        got = 0
        async with asyncio.timeout(10):
            while True:
                opcode, payload = await raw.read_frame()
                if opcode != 0x1:
                    continue
                if payload.endswith(b'"frame":{"last":1}}'):
                    break
                assert payload.endswith(chunk.encode() + b"}"), payload[:80]
                got += 1
        await last
        # all of them, in order (the send the timeout interrupted may have gone out whole)
        assert got in (sent, sent + 1), (got, sent)
        raw.close()


async def test_redis_outage_local_pairs_survive_and_cluster_recovers() -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        bl = await claim(c, r1, "local")
        pl, cid_l = await join(r1, bl, "local")
        bx = await claim(c, r1)
        px, cid_x = await join(r2, bx)
        tasks_before = [await settled(r, TASKS) for r in c.relays]
        fds_before = [open_fds(r) for r in c.relays]

        await redis.stop()
        # the cross-instance phone is closed 1013 and its binary told so
        assert await closed_with(px, 5) == UNAVAILABLE
        assert await recv_text(bx, 5) == notice(cid_x, 1013)
        for r, iid in zip(c.relays, c.ids, strict=True):
            await wait_redis_state(r, iid, "down", 5)
        await r2.wait_counts(0, 0)
        status, _, body = await r2.http("GET", "/healthz")
        assert status == 200 and healthz_pattern("i2", 0, 0, "down").fullmatch(body), body
        # the local pair keeps routing both ways, and takes a new local phone
        await round_trip(bl, pl, cid_l, "during-outage")
        pl2, cid_l2 = await join(r1, bl, "local", hello='{"pl2":1}')
        await round_trip(bl, pl2, cid_l2, "pl2")
        # nothing that needs the cluster: a remote phone, a claim of an id held nowhere here
        assert (await closed_with(await phone(r2, SID)))[0] == 1013
        assert (await closed_with(await phone(r3, "local")))[0] == 1013
        assert (await closed_with(await binary(r3, "fresh")))[0] == 1013
        await asyncio.gather(assert_silent(bx, 0.1), assert_silent(bl, 0.1))
        await pl2.close()
        assert await recv_text(bl) == notice(cid_l2, 1000)

        await redis.start()  # same port, empty: every instance re-asserts what it holds
        for r, iid in zip(c.relays, c.ids, strict=True):
            await wait_redis_state(r, iid, "up", 8)
        await c.wait_ready()
        await c.wait_owner("local", r1)
        await c.wait_owner(SID, r1)
        # full cross-instance routing again, old and new ids
        px2, cid_x2 = await join(r2, bx, hello='{"px2":1}')
        await round_trip(bx, px2, cid_x2, "px2")
        pr3, cid_r3 = await join(r3, bl, "local", hello='{"pr3":1}')
        await round_trip(bl, pr3, cid_r3, "pr3")
        bf = await claim(c, r3, "fresh")
        pf, cid_f = await join(r2, bf, "fresh")
        await round_trip(bf, pf, cid_f, "fresh")
        await round_trip(bl, pl, cid_l, "after-outage")

        # back to the pre-outage shape: nothing leaked across the outage
        await pr3.close()
        assert await recv_text(bl) == notice(cid_r3, 1000)
        await pf.close()
        assert await recv_text(bf) == notice(cid_f, 1000)
        await bf.close()
        await r1.wait_counts(2, 1)
        await r2.wait_counts(0, 1)
        await r3.wait_counts(0, 0)
        for r, tasks, fds in zip(c.relays, tasks_before, fds_before, strict=True):
            await wait_metric(r, TASKS, tasks)
            # Redis connections are pooled and opened on demand, so one more idle pooled
            # connection than before the outage is not a leak; a leak would grow with the
            # clients this test opened and closed since (eight).
            await wait_fds(r, fds, slack=1)


async def test_quiet_pair_outlives_redis_closing_idle_clients() -> None:
    """Operators and managed Redis services close idle clients (`timeout`). A cross pair
    that stays quiet for longer than that still routes its next frames both ways: the bus
    does not count a connection Redis closed while idle as an outage."""
    async with redis_server() as redis, start_cluster(redis, 2) as c:
        await redis.command("CONFIG", "SET", "timeout", "1")
        r1, r2 = c.relays
        b = await claim(c, r1)
        p, cid = await join(r2, b)
        for quiet in range(2):
            # Not luck: Redis closes a client idle for over 1 s within its next 100 ms cron.
            await asyncio.sleep(2.5)
            await round_trip(b, p, cid, f"after-quiet-{quiet}")
        for r in c.relays:
            assert r.count_log("cluster_redis_down") == 0, r.log
            assert (await r.metrics())[REDIS_UP] == 1


async def test_sighup_is_logged_once_and_never_fatal() -> None:
    async with redis_server() as redis, start_cluster(redis, 2) as c:
        r1, r2 = c.relays
        b = await claim(c, r1)
        p, cid = await join(r2, b)
        for r in c.relays:
            r.proc.send_signal(signal.SIGHUP)
            line = await r.wait_log("reload signal received")
            assert "signal=SIGHUP mode=insecure" in line
        await round_trip(b, p, cid, "after-hup")
        for r in c.relays:
            assert r.count_log("reload signal received") == 1
            assert r.count_log("cluster_redis_down") == 0
            assert r.proc.returncode is None


async def test_a_redis_address_that_accepts_and_never_answers_does_not_hold_up_start_up() -> None:
    # A wrong port, a held balancer port, a frozen server: TCP connects, nothing answers.
    # Every Redis step at start-up is bounded by the client timeout (half the 1 s lease), so
    # the relay serves (degraded) within a few of them instead of waiting forever.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        flags = (f"--cluster-redis=redis://127.0.0.1:{port}", "--cluster-lease=1s")
        async with start_relay(*flags) as relay:  # fails if `starting` takes over 10 s
            await relay.wait_log("msg=cluster_redis_down")
            assert accepted, "the relay never reached the silent server"
            assert await closed_with(await binary(relay, SID)) == UNAVAILABLE
    finally:
        for writer in accepted:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def test_redis_unreachable_at_boot_then_arrives() -> None:
    # The contract says both "Redis unreachable at boot -> the relay still starts (local
    # pairs work)" and "New claims of ids not held locally -> 1013". At boot nothing is
    # held locally, so the reading taken here is the one that cannot split the brain: the
    # relay serves, and a claim made while Redis is unreachable is refused 1013, exactly as
    # during an outage (two instances booting in an outage must not both hold an id).
    async with redis_server(started=False) as redis, start_cluster(redis, 2) as c:
        r1, r2 = c.relays
        for r, iid in zip(c.relays, c.ids, strict=True):
            await r.wait_log("msg=cluster_redis_down")
            await wait_redis_state(r, iid, "down", 5)
            status, _, body = await r.http("GET", "/healthz")
            assert status == 200 and healthz_pattern(iid, 0, 0, "down").fullmatch(body), body
        assert await closed_with(await binary(r1, SID)) == UNAVAILABLE
        assert await closed_with(await phone(r2, SID)) == UNAVAILABLE
        await r1.wait_counts(0, 0)

        await redis.start()  # the relays keep retrying and find it
        for r, iid in zip(c.relays, c.ids, strict=True):
            await wait_redis_state(r, iid, "up", 8)
        await c.wait_ready()
        b = await claim(c, r1)
        p1, cid1 = await join(r1, b)
        p2, cid2 = await join(r2, b, hello='{"p2":1}')
        await round_trip(b, p1, cid1, "local")
        await round_trip(b, p2, cid2, "remote")


# -- /healthz and metrics ----------------------------------------------------------------


async def test_healthz_cluster_field_metrics_and_keys() -> None:
    async with redis_server() as redis, start_cluster(redis, 3) as c:
        r1, r2, r3 = c.relays
        for r, iid in zip(c.relays, c.ids, strict=True):
            line = await r.wait_log("msg=starting ")
            assert f"cluster={iid}" in line.split(), line
            status, headers, body = await r.http("GET", "/healthz")
            assert status == 200
            assert healthz_pattern(iid, 0, 0, "up").fullmatch(body), body
            assert headers["content-type"] == "application/json; charset=utf-8"
            _, _, text = await r.http("GET", "/metrics", port=r.metrics_port)
            types = {}
            for text_line in text.decode().splitlines():
                if text_line.startswith("# TYPE pyrycode_relay_cluster_"):
                    _, _, name, kind = text_line.split(" ")
                    types[name.removesuffix("_total")] = kind
            assert types == {
                "pyrycode_relay_cluster_bus_messages": "counter",
                "pyrycode_relay_cluster_remote_phones": "gauge",
                "pyrycode_relay_cluster_redis_up": "gauge",
                "pyrycode_relay_cluster_lease_renew_failures": "counter",
            }, types
            m = await r.metrics()
            assert m[REDIS_UP] == 1
            assert m[REMOTE_PHONES] == 0
            assert m[RENEW_FAILURES] == 0
            assert PUBLISHED in m and RECEIVED in m
            # the liveness key and the bus subscription the contract names
            assert 0 < await redis.pttl(f"pyrycode-relay:instance:{iid}") <= LEASE * 1000
            assert await redis.subscribers(iid) == 1

        b = await claim(c, r1)
        assert 0 < await redis.pttl(f"pyrycode-relay:owner:{SID}") <= LEASE * 1000
        p1, cid1 = await join(r1, b, hello='{"local":1}')
        p2, cid2 = await join(r2, b, hello='{"remote":1}')
        # counts are this instance's WebSockets; the remote phone is counted where it is
        await r1.wait_counts(1, 1)
        await r2.wait_counts(0, 1)
        assert healthz_pattern("i1", 1, 1, "up").fullmatch((await r1.http("GET", "/healthz"))[2])
        assert healthz_pattern("i2", 0, 1, "up").fullmatch((await r2.http("GET", "/healthz"))[2])
        assert healthz_pattern("i3", 0, 0, "up").fullmatch((await r3.http("GET", "/healthz"))[2])
        await wait_metric(r2, REMOTE_PHONES, 1)
        await wait_metric(r1, REMOTE_PHONES, 0)  # a local phone is not remote
        await wait_metric(r3, REMOTE_PHONES, 0)

        # bus counters follow cross-instance traffic, both directions
        m1, m2 = await r1.metrics(), await r2.metrics()
        for i in range(5):
            await p2.send(f'{{"n":{i}}}')
        assert [await recv_text(b) for _ in range(5)] == [
            envelope(cid2, f'{{"n":{i}}}') for i in range(5)
        ]
        await wait_above(r2, PUBLISHED, m2[PUBLISHED])
        await wait_above(r1, RECEIVED, m1[RECEIVED])
        m1, m2 = await r1.metrics(), await r2.metrics()
        for i in range(5):
            await b.send(envelope(cid2, f"[{i}]"))
        assert [await recv_text(p2) for _ in range(5)] == [f"[{i}]" for i in range(5)]
        await wait_above(r1, PUBLISHED, m1[PUBLISHED])
        await wait_above(r2, RECEIVED, m2[RECEIVED])
        # a purely local pair does not use the bus
        m1 = await r1.metrics()
        await round_trip(b, p1, cid1, "local")
        assert (await r1.metrics())[PUBLISHED] == m1[PUBLISHED]

        await p2.close()
        assert await recv_text(b) == notice(cid2, 1000)
        await wait_metric(r2, REMOTE_PHONES, 0)
        await r2.wait_counts(0, 0)
        for r in c.relays:
            assert (await r.metrics())[RENEW_FAILURES] == 0


# -- boot ----------------------------------------------------------------------------------


def insecure() -> str:
    return f"--insecure-listen=127.0.0.1:{free_port()}"


def logged_at(line: str) -> float:
    """A text log line's `time=` as a POSIX timestamp (millisecond resolution)."""
    stamp = line.split("time=", 1)[1].split(" ", 1)[0]
    return dt.datetime.fromisoformat(stamp).timestamp()


def refusal_line(out: str, needle: str) -> str:
    lines = [line for line in out.splitlines() if needle in line]
    assert len(lines) == 1, out
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--instance-id=i1"], "refusing to start: --instance-id needs --cluster-redis"),
        (["--cluster-redis=http://x"], "refusing to start: invalid --cluster-redis"),
        (["--cluster-redis=redis://:notaport"], "refusing to start: invalid --cluster-redis"),
        (
            ["--cluster-redis=redis://127.0.0.1:1", "--instance-id=a b"],
            "refusing to start: invalid --instance-id",
        ),
        (
            ["--cluster-redis=redis://127.0.0.1:1", f"--instance-id={'x' * 65}"],
            "refusing to start: invalid --instance-id",
        ),
        (
            ["--cluster-redis=redis://127.0.0.1:1", "--instance-id=i/1"],
            "refusing to start: invalid --instance-id",
        ),
    ],
    ids=["id-without-redis", "http-url", "bad-port", "id-space", "id-65", "id-slash"],
)
async def test_boot_refusals(flags: list[str], needle: str) -> None:
    code, out = await run_relay_bounded(insecure(), "--metrics-listen=", *flags)
    assert code == 2, out
    refusal_line(out, needle)
    assert "msg=starting" not in out


async def test_duplicate_live_instance_id_refused_until_orderly_exit() -> None:
    async with redis_server() as redis:
        async with start_cluster(redis, 1) as c:
            (r1,) = c.relays
            code, out = await run_relay_bounded(
                insecure(),
                "--metrics-listen=",
                f"--cluster-redis={redis.url}",
                "--instance-id=i1",
                "--cluster-lease=1s",  # the same lease as the live one (it waits 1.5 leases)
                timeout=5,
            )
            assert code == 2, out
            refused = refusal_line(
                out, "refusing to start: instance id already live in the cluster"
            )
            assert "msg=starting" not in out
            # The wait is announced as soon as the id is seen held, well before the refusal.
            held = refusal_line(out, "msg=cluster_instance_id_held")
            assert " level=WARN " in held and " instance_id=i1 wait_ms=1500 " in held, held
            assert "waiting up to 1.5s for its key to expire, then refusing to start" in held
            assert logged_at(refused) - logged_at(held) >= 1.0, out
            # the refused process did not disturb the live one
            assert await redis.instance_live("i1")
            b = await claim(c, r1)
            await assert_silent(b, 0.1)
            assert await r1.stop() == 0  # orderly: its instance key is deleted
            assert not await redis.instance_live("i1")
        async with start_cluster(redis, 1) as c:  # so the id may be used again at once
            await c.wait_ready()


async def test_same_instance_id_started_during_an_outage_stays_off_the_bus() -> None:
    """The boot check cannot see a duplicate while Redis is down. When Redis comes, the
    first process to reconnect takes the id; keep-alive refuses to overwrite its key, so
    the second logs the clash and stays off the bus (as in an outage) instead of sharing
    the first one's channel."""
    async with redis_server(started=False) as redis:
        flags = (f"--cluster-redis={redis.url}", "--instance-id=dup", "--cluster-lease=1s")
        async with start_relay(*flags) as first, start_relay(*flags) as second:
            await redis.start()
            ups = [
                asyncio.create_task(wait_redis_state(r, "dup", "up", 8)) for r in (first, second)
            ]
            done, _ = await asyncio.wait(ups, return_when=asyncio.FIRST_COMPLETED)
            winner, loser = (first, second) if ups[0] in done else (second, first)
            for task in ups:
                task.cancel()
            await asyncio.gather(*ups, return_exceptions=True)
            await loser.wait_log("msg=cluster_instance_id_taken instance_id=dup", timeout=5)
            await wait_redis_state(loser, "dup", "down", 3)
            assert await redis.subscribers("dup") == 1  # only the winner is on the channel
            await assert_silent(await binary(winner, "free-id"), 0.2)  # it claims normally
            assert (await closed_with(await binary(loser, "other-id")))[0] == 1013


async def test_default_and_longest_instance_ids_and_fly_app_name() -> None:
    longest = "A-z.0_9" * 9 + "x"  # 64 characters from the allowed set
    assert len(longest) == 64
    async with (
        redis_server() as redis,
        start_relay(f"--cluster-redis={redis.url}", "--cluster-lease=1s") as ra,
        start_relay(
            f"--cluster-redis={redis.url}",
            f"--instance-id={longest}",
            "--cluster-lease=1s",
            env={"FLY_APP_NAME": "fly-app-marker-5e2"},  # no multi-instance refusal here
        ) as rb,
    ):
        default_id = (await ra.healthz())["cluster"]["instance_id"]
        assert re.fullmatch(r"relay-[0-9a-f]{8}", default_id), default_id
        assert f"cluster={default_id}" in (await ra.wait_log("msg=starting ")).split()
        assert (await rb.healthz())["cluster"] == {"instance_id": longest, "redis": "up"}
        assert await redis.instance_live(default_id)
        assert await redis.instance_live(longest)
        # and the two form a cluster
        b = await binary(ra, SID)
        await redis.wait_owner(SID, default_id)
        await ra.wait_log(claimed_line(SID))
        p, cid = await join(rb, b)
        await round_trip(b, p, cid, "ab")
