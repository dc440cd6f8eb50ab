"""Conformance §15 E: slow or stalled phones and the per-phone outbox (scenarios 41-45),
plus the relay-wide `--max-buffered-bytes` budget (README §2).

A stalled phone is a `RawWs` that never reads: the relay's socket to it fills (loopback
kernel buffers absorb a few MiB first), then frames queue in its outbox. To know exactly
what the relay has enqueued, a second, reading phone serves as a probe: the binary's
messages are processed in order, so once the probe frame arrives, everything sent before
it has been enqueued.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from typing import Any

from websockets.asyncio.client import ClientConnection

from tests.e2e.harness import (
    RawWs,
    Relay,
    assert_silent,
    binary,
    phone,
    recv,
    recv_json,
    start_relay,
)

KIB = 1024
MIB = 1024 * KIB
OVERHEAD = 64  # per queued item (reference §7.6)
FLOOD_FRAME = '"' + "x" * (64 * KIB) + '"'  # a 64 KiB JSON string frame
BACKLOG_FULL = 'err="relay: phone delivery backlog full"'


def envelope(conn_id: str, frame: str) -> str:
    return f'{{"conn_id":"{conn_id}","frame":{frame}}}'


def notice(conn_id: str, code: int) -> str:
    return f'{{"conn_id":"{conn_id}","close_code":{code}}}'


async def recv_text(ws: ClientConnection) -> str:
    msg = await recv(ws)
    assert isinstance(msg, str), f"expected a text frame, got {msg!r}"
    return msg


async def stalled_phone(relay: Relay, b: ClientConnection, server_id: str) -> tuple[RawWs, str]:
    """A phone that never reads; its conn_id learned from one frame it sends."""
    raw = await RawWs.connect(relay, "client", server_id)
    raw.send_frame(0x1, b'{"hello":"raw"}')
    env = await recv_json(b)
    assert env["frame"] == {"hello": "raw"}
    return raw, env["conn_id"]


async def reading_phone(
    relay: Relay, b: ClientConnection, server_id: str, **kwargs: Any
) -> tuple[ClientConnection, str]:
    p = await phone(relay, server_id, **kwargs)
    await p.send('{"hello":"ws"}')
    env = await recv_json(b)
    assert env["frame"] == {"hello": "ws"}
    return p, env["conn_id"]


async def sync(b: ClientConnection, probe: ClientConnection, probe_id: str, n: int) -> float:
    """Round-trip a marker through the probe phone: everything `b` sent before is now
    enqueued by the relay. Returns the delivery latency in seconds."""
    start = time.monotonic()
    await b.send(envelope(probe_id, f'{{"sync":{n}}}'))
    assert await recv_text(probe) == f'{{"sync":{n}}}'
    return time.monotonic() - start


async def outbox_bytes(relay: Relay) -> float:
    return (await relay.metrics())["pyrycode_relay_outbox_bytes"]


async def wait_outbox_empty(relay: Relay) -> None:
    """Polls the gauge (at most 3 s) until every outbox is empty."""
    value = -1.0
    for _ in range(150):
        value = await outbox_bytes(relay)
        if value == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"pyrycode_relay_outbox_bytes stuck at {value}")


async def read_close(raw: RawWs) -> tuple[int, str] | None:
    """Reads (discarding data frames) up to the relay's close frame: (code, reason), or
    None if TCP ended first. Bounded: 5 s and 20 000 frames."""
    async with asyncio.timeout(5):
        for _ in range(20_000):
            try:
                opcode, payload = await raw.read_frame()
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == 0x8:
                code = int(struct.unpack("!H", payload[:2])[0]) if payload else 1005
                return code, payload[2:].decode()
    raise AssertionError("no close frame within 20 000 frames")


async def fill_until(
    relay: Relay,
    b: ClientConnection,
    target_id: str,
    probe: ClientConnection,
    probe_id: str,
    *,
    at_least: int,
) -> float:
    """Send 64 KiB frames to a stalled phone until the relay holds `at_least` queued
    bytes (exactly known via the probe). Returns the gauge's value."""
    for n in range(300):  # the kernel takes a few MiB (~70 frames) before anything queues
        await b.send(envelope(target_id, FLOOD_FRAME))
        await sync(b, probe, probe_id, n)
        queued = await outbox_bytes(relay)
        if queued >= at_least:
            return queued
    raise AssertionError("the stalled phone's outbox never filled")


# Tests that stall a phone on purpose give it a write timeout that cannot fire first on a
# loaded CI machine; the write-timeout path has its own test below.
PATIENT = "--write-timeout=30s"


async def test_stalled_phone_does_not_block_others() -> None:  # E41
    async with start_relay(PATIENT) as relay:
        b = await binary(relay, "s1")
        raw, stalled_id = await stalled_phone(relay, b, "s1")
        p2, p2_id = await reading_phone(relay, b, "s1")
        latencies: list[float] = []
        queued = 0.0
        for n in range(300):
            await b.send(envelope(stalled_id, FLOOD_FRAME))
            latencies.append(await sync(b, p2, p2_id, n))
            if n % 8 == 0:  # the binary still reads phone frames promptly
                await p2.send(f'{{"up":{n}}}')
                assert await recv_json(b) == {"conn_id": p2_id, "frame": {"up": n}}
            queued = await outbox_bytes(relay)
            if queued >= 1 * MIB:
                break
        assert queued >= 1 * MIB, "the stalled phone's outbox never backed up"
        # With the stalled outbox holding over 1 MiB, the other phone is still served at once.
        for n in range(300, 320):
            await b.send(envelope(stalled_id, '{"more":1}'))
            latencies.append(await sync(b, p2, p2_id, n))
        await p2.send('{"up":"last"}')
        assert await recv_json(b) == {"conn_id": p2_id, "frame": {"up": "last"}}
        assert max(latencies) < 0.5, max(latencies)
        await relay.wait_counts(1, 2)  # the stalled phone is slow, not dropped
        assert relay.count_log("binary_forwarder_phone_enqueue_failed") == 0
        raw.close()


async def test_burst_of_300_delivered_in_order() -> None:  # E42
    async with start_relay(PATIENT) as relay:
        b = await binary(relay, "s1")
        # max_queue=1: the client stops reading its socket while we do not call recv.
        p, p_id = await reading_phone(relay, b, "s1", max_queue=1)
        probe, probe_id = await reading_phone(relay, b, "s1")
        frames = [f'{{"seq":{i},"pad":"{"p" * 1000}"}}' for i in range(300)]
        for frame in frames:
            await b.send(envelope(p_id, frame))
        await sync(b, probe, probe_id, 0)  # all 300 accepted while P was not reading
        got = [await recv_text(p) for _ in range(300)]
        assert got == frames
        await assert_silent(p, 0.2)
        await relay.wait_counts(1, 2)
        assert relay.count_log("binary_forwarder_phone_enqueue_failed") == 0
        await wait_outbox_empty(relay)


async def test_overflow_closes_1011_binary_and_others_unaffected() -> None:  # E43
    budget = 1 * MIB
    async with start_relay("--phone-outbox-bytes=1MiB", PATIENT) as relay:
        b = await binary(relay, "s1")
        raw, stalled_id = await stalled_phone(relay, b, "s1")
        p2, p2_id = await reading_phone(relay, b, "s1")
        big = '"' + "y" * (256 * KIB - 200) + '"'  # the envelope stays under 256 KiB
        samples: list[float] = []
        for _ in range(100):  # ~4 MiB in kernel buffers + 1 MiB queued ≈ 20 frames
            await b.send(envelope(stalled_id, big))
            await (await b.ping())  # barrier: the relay has parsed the frame (pong after it)
            samples.append(await outbox_bytes(relay))
            if relay.count_log("msg=binary_forwarder_phone_enqueue_failed"):
                break
        line = await relay.wait_log("msg=binary_forwarder_phone_enqueue_failed")
        assert f"conn_id={stalled_id}" in line and BACKLOG_FULL in line
        assert max(samples) <= budget, max(samples)
        assert max(samples) > 0  # the outbox really did back up
        assert await read_close(raw) == (1011, "phone backlog full")
        raw.close()
        # README §3 decision 1: the notice carries the code the relay sent.
        assert await recv_text(b) == notice(stalled_id, 1011)
        await relay.wait_counts(1, 1)
        await wait_outbox_empty(relay)
        # The binary is still up and the other phone unaffected, both directions.
        await b.send(envelope(p2_id, '{"after":"overflow"}'))
        assert await recv_text(p2) == '{"after":"overflow"}'
        await p2.send('{"from":"p2"}')
        assert await recv_json(b) == {"conn_id": p2_id, "frame": {"from": "p2"}}
        await assert_silent(p2, 0.1)


async def test_overflow_on_close_directive_uses_its_code() -> None:  # E44
    budget = 1 * MIB
    async with start_relay("--phone-outbox-bytes=1MiB", PATIENT) as relay:
        b = await binary(relay, "s1")
        raw, stalled_id = await stalled_phone(relay, b, "s1")
        probe, probe_id = await reading_phone(relay, b, "s1")
        queued = await fill_until(relay, b, stalled_id, probe, probe_id, at_least=budget - 200_000)
        assert queued <= budget - 200_000 + len(FLOOD_FRAME) + OVERHEAD
        # A directive whose frame cannot fit in what is left of the budget.
        frame = '"' + "z" * 210_000 + '"'
        await b.send(f'{{"conn_id":"{stalled_id}","frame":{frame},"close_code":4401}}')
        line = await relay.wait_log("msg=binary_forwarder_phone_enqueue_failed")
        assert f"conn_id={stalled_id}" in line and BACKLOG_FULL in line
        assert await read_close(raw) == (4401, "phone backlog full")
        raw.close()
        await relay.wait_counts(1, 1)
        await assert_silent(b, 0.2)  # a binary-requested close: no notice
        await wait_outbox_empty(relay)
        await sync(b, probe, probe_id, 999)


async def test_write_timeout_closes_and_unregisters_phone() -> None:  # E45
    async with start_relay(
        "--write-timeout=1s", "--max-message-bytes=20MiB", "--phone-outbox-bytes=32MiB"
    ) as relay:
        b = await binary(relay, "s1")
        raw, stalled_id = await stalled_phone(relay, b, "s1")
        p2, p2_id = await reading_phone(relay, b, "s1")
        huge = '"' + "w" * (16 * MIB) + '"'  # far more than loopback buffers hold
        await b.send(envelope(stalled_id, huge))
        line = await relay.wait_log("msg=binary_forwarder_phone_send_failed", timeout=5)
        assert f"conn_id={stalled_id}" in line
        # Best effort: the phone may see the close frame, or only the end of TCP.
        assert await read_close(raw) in ((1011, "phone write failed"), None)
        raw.close()
        await relay.wait_counts(1, 1, timeout=5)
        assert await recv_text(b) == notice(stalled_id, 1011)  # README §3 decision 1
        await wait_outbox_empty(relay)
        await b.send(envelope(p2_id, '{"after":"timeout"}'))
        assert await recv_text(p2) == '{"after":"timeout"}'
        await p2.send('{"from":"p2"}')
        assert json.loads(await recv_text(b))["frame"] == {"from": "p2"}


async def test_relay_wide_buffer_budget_closes_the_overflowing_phone() -> None:  # E43 + README §2
    budget = 600 * KIB
    async with start_relay(
        "--max-buffered-bytes=600KiB", "--phone-outbox-bytes=4MiB", PATIENT
    ) as relay:
        b = await binary(relay, "s1")
        raw1, id1 = await stalled_phone(relay, b, "s1")
        raw2, id2 = await stalled_phone(relay, b, "s1")
        probe, probe_id = await reading_phone(relay, b, "s1")
        first = await fill_until(relay, b, id1, probe, probe_id, at_least=400 * KIB)
        assert first <= budget
        samples: list[float] = []
        for n in range(300):  # P2 is well under its own 4 MiB when the total runs out
            await b.send(envelope(id2, FLOOD_FRAME))
            await sync(b, probe, probe_id, 1000 + n)
            samples.append(await outbox_bytes(relay))
            if relay.count_log("msg=binary_forwarder_phone_enqueue_failed"):
                break
        line = await relay.wait_log("msg=binary_forwarder_phone_enqueue_failed")
        assert f"conn_id={id2}" in line and BACKLOG_FULL in line
        assert max(samples) <= budget, max(samples)
        assert await read_close(raw2) == (1011, "phone backlog full")
        raw2.close()
        assert await recv_text(b) == notice(id2, 1011)
        await relay.wait_counts(1, 2)  # P1 (still stalled) and the probe remain
        # P1's queue is untouched: the gauge still holds what P1 had queued.
        assert await outbox_bytes(relay) >= 400 * KIB
        assert not any(id1 in line and "enqueue_failed" in line for line in relay.lines)
        raw1.close()
