"""Conformance §15 B: claim conflicts, grace, reclaim, takeover (scenarios 12-19)."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest

from tests.e2e.harness import (
    RawWs,
    assert_silent,
    binary,
    closed_with,
    paired,
    phone,
    raw_read_close,
    recv,
    recv_json,
    start_relay,
    wait_metric,
)

SID = "s1"
RECLAIMED = (4404, "binary reclaimed server-id")
NO_SERVER = (4404, "no server with that id")
CONFLICT = (4409, "server-id already claimed")

SERVER_ACCEPT = 'pyrycode_relay_ws_upgrade_attempts_total{endpoint="server",outcome="accept"}'
SERVER_409 = 'pyrycode_relay_ws_upgrade_attempts_total{endpoint="server",outcome="reject_409"}'
IN_USE = 'pyrycode_relay_register_failures_total{kind="server_in_use"}'
TAKEOVERS = "pyrycode_relay_takeovers_total"
RECLAIM_EVICTIONS = "pyrycode_relay_reclaim_evictions_total"
GRACE_EXPIRIES = "pyrycode_relay_grace_expiries_total"
OUTBOX_BYTES = "pyrycode_relay_outbox_bytes"

PHONE_OUTBOX_BUDGET = 4 * 1024 * 1024  # reference default (--phone-outbox-bytes)
BIG_FRAME_CHARS = 256 * 1024 - 200  # a JSON string frame; the envelope stays under 256 KiB


async def test_duplicate_claim_live_incumbent_4409() -> None:  # B12
    async with start_relay() as relay:
        b1, p1, cid = await paired(relay, SID)
        b2 = await binary(relay, SID)
        assert await closed_with(b2) == CONFLICT
        # the incumbent and its phone are untouched and still route both ways
        await p1.send('{"after":"conflict"}')
        assert await recv_json(b1) == {"conn_id": cid, "frame": {"after": "conflict"}}
        await b1.send(json.dumps({"conn_id": cid, "frame": {"reply": 2}}))
        assert await recv_json(p1) == {"reply": 2}
        await relay.wait_counts(1, 1)
        line = await relay.wait_log("msg=server_id_conflict server_id=s1 remote=127.0.0.1")
        assert "binary_version" not in line
        m = await relay.metrics()
        assert m[SERVER_409] == 1
        assert m[IN_USE] == 1
        assert m[SERVER_ACCEPT] == 1
        assert m[TAKEOVERS] == 0


async def test_unresponsive_incumbent_taken_over() -> None:  # B13
    grace = 0.3
    async with start_relay("--grace-period=300ms", "--conflict-probe-timeout=400ms") as relay:
        b1 = await RawWs.connect(relay, "server", SID)  # never reads, so never pongs
        try:
            await relay.wait_log("msg=server_claimed server_id=s1")
            p1 = await phone(relay, SID)
            await relay.wait_counts(1, 1)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            b2 = await binary(relay, SID)
            assert await closed_with(p1) == RECLAIMED
            assert loop.time() - t0 >= 0.39, "takeover before --conflict-probe-timeout"
            code, reason, _ = await raw_read_close(b1)
            assert (code, reason) == (1011, "heartbeat timeout")
            # answer the close so the relay drops TCP and the old handler unwinds now
            b1.send_frame(0x8, struct.pack("!H", 1011))
            assert await b1.read_until_closed() is None  # EOF: the relay closed TCP
            # the new binary holds the slot: a phone frame reaches it
            p2 = await phone(relay, SID)
            await p2.send('{"to":"b2"}')
            env = await recv_json(b2)
            assert env["frame"] == {"to": "b2"}
            # 3x grace later: no stray release armed by the displaced incumbent
            await asyncio.gather(assert_silent(b2, 3 * grace), assert_silent(p2, 3 * grace))
            await p2.send('{"still":"b2"}')
            assert await recv_json(b2) == {"conn_id": env["conn_id"], "frame": {"still": "b2"}}
            await relay.wait_counts(1, 1)
            assert relay.count_log("msg=server_released") == 0
            await relay.wait_log("msg=server_id_takeover server_id=s1 remote=127.0.0.1")
            m = await relay.metrics()
            assert m[TAKEOVERS] == 1
            assert m[SERVER_ACCEPT] == 2
            assert m[SERVER_409] == 0
            assert m[GRACE_EXPIRIES] == 0
        finally:
            b1.close()


async def test_stalled_phone_does_not_cost_live_incumbent_its_slot() -> None:  # B14
    # a long write timeout: the stalled phone must not be dropped while we look at it
    async with start_relay("--write-timeout=10s") as relay:
        b1 = await binary(relay, SID)
        p1 = await RawWs.connect(relay, "client", SID)  # never reads
        try:
            p1.send_frame(0x1, b'{"hello":"stalled"}')
            cid = (await recv_json(b1))["conn_id"]
            big = json.dumps({"conn_id": cid, "frame": "x" * BIG_FRAME_CHARS})
            frame_cost = BIG_FRAME_CHARS + 2 + 64
            # full-size frames until P1's socket is stuck: one frame being written and at
            # least one more queued behind it in the outbox
            for _ in range(80):
                await b1.send(big)
                # barrier: the relay's pong follows every frame B1 sent before the ping
                # (a scrape on another connection may be answered while B1's data is
                # still being parsed)
                await (await b1.ping())
                if (await relay.metrics())[OUTBOX_BYTES] >= 2 * frame_cost:
                    break
            else:
                raise AssertionError("writes to the stalled phone never blocked")
            b2 = await binary(relay, SID)
            assert await closed_with(b2) == CONFLICT
            # B1 still holds s1, P1 is still registered (not closed), backlog under budget
            await relay.wait_counts(1, 1)
            m = await relay.metrics()
            assert 0 < m[OUTBOX_BYTES] <= PHONE_OUTBOX_BUDGET
            assert m[SERVER_409] == 1
            assert m[TAKEOVERS] == 0
            assert relay.count_log("msg=phone_unregistered") == 0
            assert relay.count_log("phone backlog full") == 0
            p2 = await phone(relay, SID)
            await p2.send('{"p2":1}')
            assert (await recv_json(b1))["frame"] == {"p2": 1}
            await relay.wait_counts(1, 2)
        finally:
            p1.close()


async def test_grace_release_is_delayed() -> None:  # B15
    grace = 1.0
    async with start_relay("--grace-period=1s") as relay:
        b = await binary(relay, SID)
        await relay.wait_counts(1, 0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.close()
        await relay.wait_log("msg=server_released server_id=s1")
        # early in the grace window: a new phone is accepted and registered, while the
        # binary in grace is no longer counted (#115)
        p = await phone(relay, SID)
        await relay.wait_counts(0, 1)
        await relay.wait_log("msg=phone_registered server_id=s1")
        assert (await relay.metrics())["pyrycode_relay_connected_binaries"] == 0
        # the slot is freed only when the grace period ends
        assert await closed_with(p, timeout=grace + 2) == (1000, "")
        assert loop.time() - t0 >= grace - 0.05, "slot released before the grace period"
        late = await phone(relay, SID)
        assert await closed_with(late) == NO_SERVER
        await relay.wait_counts(0, 0)


async def test_reconnect_within_grace_reclaims() -> None:  # B16
    grace = 0.4
    async with start_relay("--grace-period=400ms") as relay:
        b1, p1, cid1 = await paired(relay, SID)
        await b1.close()
        await relay.wait_log("msg=server_released server_id=s1")
        b2 = await binary(relay, SID)  # within grace: accepted at once, no 4409
        assert await closed_with(p1) == RECLAIMED
        p1b = await phone(relay, SID)  # P1 reconnects
        await p1b.send('{"new":1}')
        first = await recv(b2)  # B2's first message: P1's new frame, no close notice
        assert isinstance(first, str)
        env = json.loads(first)
        assert env["frame"] == {"new": 1}
        assert set(env) == {"conn_id", "frame"}
        assert env["conn_id"].startswith("client-s1-") and env["conn_id"] != cid1
        # the cancelled grace timer has no effect later (3x grace)
        await asyncio.gather(assert_silent(b2, 3 * grace), assert_silent(p1b, 3 * grace))
        await relay.wait_counts(1, 1)
        m = await relay.metrics()
        assert m[SERVER_409] == 0
        assert m[SERVER_ACCEPT] == 2
        assert m[RECLAIM_EVICTIONS] == 1
        assert m[TAKEOVERS] == 0
        assert m[GRACE_EXPIRIES] == 0


async def test_grace_expiry() -> None:  # B17
    async with start_relay() as relay:
        b1 = await binary(relay, SID)
        p1 = await phone(relay, SID)
        p2 = await phone(relay, SID)
        await relay.wait_counts(1, 2)
        await b1.close()
        c1, c2 = await asyncio.gather(closed_with(p1), closed_with(p2))
        assert c1 == c2 == (1000, "")
        await relay.wait_counts(0, 0)
        late = await phone(relay, SID)
        assert await closed_with(late) == NO_SERVER
        m = await relay.metrics()
        assert m[GRACE_EXPIRIES] == 1
        assert m[RECLAIM_EVICTIONS] == 0
        # a new binary claims normally, and serves phones
        b2 = await binary(relay, SID)
        p3 = await phone(relay, SID)
        await p3.send('{"fresh":true}')
        assert (await recv_json(b2))["frame"] == {"fresh": True}
        await relay.wait_counts(1, 1)
        m = await relay.metrics()
        assert m[SERVER_ACCEPT] == 2
        assert m[SERVER_409] == 0
        assert m[GRACE_EXPIRIES] == 1


@pytest.mark.parametrize("ending", ["reclaim", "expiry"])
async def test_phone_registered_during_grace(ending: str) -> None:  # B18
    async with start_relay() as relay:
        b1 = await binary(relay, SID)
        await b1.close()
        await relay.wait_log("msg=server_released server_id=s1")
        p = await phone(relay, SID)  # 101 and registered, although B1 is in grace
        await relay.wait_counts(0, 1)
        if ending == "reclaim":
            b2 = await binary(relay, SID)
            assert await closed_with(p) == RECLAIMED
            await relay.wait_counts(1, 0)
            await assert_silent(b2, 0.2)  # no close notice for the evicted phone
            assert (await relay.metrics())[GRACE_EXPIRIES] == 0
        else:
            assert await closed_with(p) == (1000, "")
            await relay.wait_counts(0, 0)
            assert (await relay.metrics())[GRACE_EXPIRIES] == 1


async def test_reclaim_after_release() -> None:  # B19
    async with start_relay("--grace-period=200ms") as relay:
        b1 = await binary(relay, SID)
        await relay.wait_counts(1, 0)
        await b1.close()
        await wait_metric(relay, GRACE_EXPIRIES, 1)  # fully released
        b2 = await binary(relay, SID)
        await relay.wait_counts(1, 0)
        await assert_silent(b2, 0.1)
        assert relay.count_log("msg=server_claimed server_id=s1") == 2
        p = await phone(relay, SID)
        await p.send('{"n":1}')
        env = await recv_json(b2)
        assert env["frame"] == {"n": 1} and env["conn_id"].startswith("client-s1-")
        await b2.send(json.dumps({"conn_id": env["conn_id"], "frame": {"back": 1}}))
        assert await recv_json(p) == {"back": 1}
        await relay.wait_counts(1, 1)
        m = await relay.metrics()
        assert m[SERVER_ACCEPT] == 2
        assert m[SERVER_409] == 0
        assert m[RECLAIM_EVICTIONS] == 0
