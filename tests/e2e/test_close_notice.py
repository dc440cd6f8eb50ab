"""Conformance §15 D: the phone close notice (scenarios 35-40), plus README §3 decision 1
(a phone the relay closed itself: the notice carries the code the relay sent)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from tests.e2e.harness import (
    RawWs,
    Relay,
    assert_silent,
    binary,
    closed_with,
    paired,
    phone,
    raw_read_close,
    recv,
    recv_json,
    start_relay,
)

SID = "s1"
RECLAIMED = (4404, "binary reclaimed server-id")


def notice(conn_id: str, code: int) -> str:
    """The exact close-notice text: key order conn_id, close_code; no `frame` key."""
    return f'{{"conn_id":"{conn_id}","close_code":{code}}}'


async def raw_phone(relay: Relay, b: ClientConnection) -> tuple[RawWs, str]:
    """A raw-socket phone that has sent one frame, and its conn_id as the binary saw it."""
    p = await RawWs.connect(relay, "client", SID)
    p.send_frame(0x1, b'{"hello":"raw"}')
    env = await recv_json(b)
    assert env["frame"] == {"hello": "raw"}
    return p, str(env["conn_id"])


async def test_phone_close_1000_exact_notice() -> None:  # D35
    async with start_relay() as relay:
        b, p, cid = await paired(relay, SID)
        await p.close()
        assert await recv(b) == notice(cid, 1000)
        await relay.wait_counts(1, 0)
        await assert_silent(b)  # exactly one notice


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_phone_tcp_drop_notice_1001(how: str) -> None:  # D36
    async with start_relay() as relay:
        b = await binary(relay, SID)
        if how == "fin":  # raw socket closed without any close frame
            raw, cid = await raw_phone(relay, b)
            raw.close()
        else:  # websockets client whose transport is aborted (TCP reset)
            p = await phone(relay, SID)
            await p.send('{"hello":"ws"}')
            cid = (await recv_json(b))["conn_id"]
            p.transport.abort()
        assert await recv(b) == notice(cid, 1001)
        await relay.wait_counts(1, 0)
        await assert_silent(b, 0.1)


@pytest.mark.parametrize("code", [4000, 4401, 4999])
async def test_phone_close_4000_range_code_echoed(code: int) -> None:  # D37
    async with start_relay() as relay:
        b, p, cid = await paired(relay, SID)
        await p.close(code=code, reason="bye")
        assert await recv(b) == notice(cid, code)
        await relay.wait_counts(1, 0)
        await assert_silent(b, 0.1)


async def test_phone_close_without_status_notice_1005() -> None:  # D (§6.3 edge case)
    async with start_relay() as relay:
        b = await binary(relay, SID)
        raw, cid = await raw_phone(relay, b)
        try:
            raw.send_frame(0x8, b"")  # a close frame with no status code
            assert await raw.read_until_closed() is not None  # the relay answered the close
            assert await recv(b) == notice(cid, 1005)
            await relay.wait_counts(1, 0)
        finally:
            raw.close()


@pytest.mark.parametrize("with_frame", [False, True])
async def test_binary_requested_close_no_notice(with_frame: bool) -> None:  # D38 (C26)
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, SID)
        p2 = await phone(relay, SID)
        await p2.send('{"p2":"hello"}')
        cid2 = (await recv_json(b))["conn_id"]
        directive: dict[str, Any] = {"conn_id": cid1, "close_code": 4401}
        if with_frame:
            directive["frame"] = {"type": "error"}
        await b.send(json.dumps(directive))
        if with_frame:
            assert await recv_json(p1) == {"type": "error"}
        assert await closed_with(p1) == (4401, "")
        await relay.wait_counts(1, 1)  # P1's teardown (where a notice would be sent) is done
        await p2.send('{"after":1}')
        assert await recv_json(b) == {"conn_id": cid2, "frame": {"after": 1}}
        await assert_silent(b, 0.1)


async def test_binary_replaced_by_reclaim_no_notice() -> None:  # D39
    async with start_relay("--grace-period=2s") as relay:
        b1, p1, _ = await paired(relay, SID)
        await b1.close()
        await relay.wait_log("msg=server_released server_id=s1")
        b2 = await binary(relay, SID)
        assert await closed_with(p1) == RECLAIMED
        await relay.wait_counts(1, 0)  # P1's teardown is done
        p2 = await phone(relay, SID)
        await p2.send('{"first":"for b2"}')
        first = await recv_json(b2)  # no notice for P1 came before it
        assert set(first) == {"conn_id", "frame"} and first["frame"] == {"first": "for b2"}
        # nor was one attempted toward the old binary in grace
        assert relay.count_log("phone_close_notice_send_failed") == 0


async def test_binary_replaced_by_takeover_no_notice() -> None:  # D39
    async with start_relay() as relay:
        b1 = await RawWs.connect(relay, "server", SID)  # never reads: loses a probe
        try:
            await relay.wait_log("msg=server_claimed server_id=s1")
            p1 = await phone(relay, SID)
            await p1.send('{"to":"b1"}')
            await relay.wait_log("msg=phone_registered server_id=s1")
            b2 = await binary(relay, SID)
            assert await closed_with(p1) == RECLAIMED
            code, reason, frames = await raw_read_close(b1)
            assert (code, reason) == (1011, "heartbeat timeout")
            # B1 got P1's frame and nothing else: no close notice
            assert [json.loads(f)["frame"] for f in frames] == [{"to": "b1"}]
            assert all(b'"close_code"' not in f for f in frames)
            await relay.wait_counts(1, 0)
            p2 = await phone(relay, SID)
            await p2.send('{"first":"for b2"}')
            first = await recv_json(b2)
            assert set(first) == {"conn_id", "frame"} and first["frame"] == {"first": "for b2"}
        finally:
            b1.close()


async def test_notice_follows_last_frame() -> None:  # D40
    async with start_relay() as relay:
        b, p, cid = await paired(relay, SID)
        for i in range(5):
            await p.send(json.dumps({"seq": i}))
        await p.close()
        got = [await recv(b) for _ in range(6)]
        assert [json.loads(m) for m in got[:5]] == [
            {"conn_id": cid, "frame": {"seq": i}} for i in range(5)
        ]
        assert got[5] == notice(cid, 1000)
        await assert_silent(b, 0.1)


async def test_backlog_overflow_notice_1011() -> None:  # README §3 decision 1 (E43)
    frame_chars = 256 * 1024 - 200
    async with start_relay("--phone-outbox-bytes=1MiB", "--write-timeout=1s") as relay:
        b = await binary(relay, SID)
        raw, cid = await raw_phone(relay, b)  # never reads from now on
        try:
            big = json.dumps({"conn_id": cid, "frame": "x" * frame_chars})
            for _ in range(120):
                if relay.count_log('err="relay: phone delivery backlog full"'):
                    break
                await b.send(big)
            # The sends can all complete before the relay has read them (the kernel buffers
            # between binary and relay hold MiBs), so wait for the overflow instead of failing
            # at once: 30 MiB is far more than the 1 MiB outbox plus the stalled socket's buffers.
            await relay.wait_log('err="relay: phone delivery backlog full"', timeout=15)
            await relay.wait_log("msg=binary_forwarder_phone_enqueue_failed server_id=s1")
            assert await recv(b, timeout=5) == notice(cid, 1011)
            await relay.wait_counts(1, 0)
            assert relay.count_log("msg=binary_forwarder_phone_send_failed") == 0
            # the binary is unaffected: another phone still routes
            p2 = await phone(relay, SID)
            await p2.send('{"ok":1}')
            assert (await recv_json(b))["frame"] == {"ok": 1}
        finally:
            raw.close()


async def test_no_notice_on_connect() -> None:  # D (§6.3: no notice when a phone connects)
    async with start_relay() as relay:
        b = await binary(relay, SID)
        await phone(relay, SID)
        await relay.wait_counts(1, 1)
        await assert_silent(b, 0.2)
