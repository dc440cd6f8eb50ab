"""Conformance §15 F: message size cap, per-message read deadline, heartbeat, slow headers."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

import pytest

from tests.e2e.harness import (
    RawWs,
    Relay,
    assert_silent,
    binary,
    closed_with,
    encode_frame,
    paired,
    phone,
    raw_read_close,
    recv,
    recv_json,
    start_relay,
    wait_metric,
)

SMALL_CAP = 65536
DEFAULT_CAP = 262144
# The reference's library names the read size, one byte past the cap (reference §6.1).
SMALL_CAP_REASON = "read limited at 65537 bytes"
DEFAULT_CAP_REASON = "read limited at 262145 bytes"


def json_string(n: int, fill: str = "x") -> str:
    """A JSON text (a string literal) of exactly `n` bytes."""
    return '"' + fill * (n - 2) + '"'


def envelope_of(conn_id: str, n: int) -> tuple[str, str]:
    """A binary envelope of exactly `n` bytes and the inner frame it carries."""
    prefix, suffix = f'{{"conn_id":"{conn_id}","frame":', "}"
    frame = json_string(n - len(prefix) - len(suffix), "y")
    return prefix + frame + suffix, frame


def reply_close(raw: RawWs, code: int | None) -> None:
    """Complete the close handshake like a real peer, so the relay drops TCP at once."""
    if code is not None:
        raw.send_frame(0x8, struct.pack("!H", code))


def hb_series(endpoint: str) -> str:
    return f'pyrycode_relay_heartbeat_closes_total{{endpoint="{endpoint}"}}'


async def answer_pings(raw: RawWs, seconds: float) -> int:
    """Acts as a healthy raw peer for `seconds`: answers every ping; returns how many came.
    Fails if the relay closes or sends anything else."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    pings = 0
    for _ in range(1000):
        left = end - loop.time()
        if left <= 0:
            break
        try:
            opcode, payload = await raw.read_frame(left)
        except TimeoutError:
            break
        assert opcode == 0x9, f"unexpected frame {opcode:#x} {payload!r}"
        pings += 1
        raw.send_frame(0xA, payload)
    return pings


# -- size cap -----------------------------------------------------------------------


async def test_message_at_cap_passes_both_directions() -> None:  # F46
    async with start_relay(f"--max-message-bytes={SMALL_CAP}") as relay:
        b, p, cid = await paired(relay, "s1")
        msg = json_string(SMALL_CAP)
        await p.send(msg)
        assert await recv(b) == f'{{"conn_id":"{cid}","frame":{msg}}}'
        env, frame = envelope_of(cid, SMALL_CAP)
        assert len(env.encode()) == SMALL_CAP
        await b.send(env)
        assert await recv(p) == frame
        await relay.wait_counts(1, 1)


async def test_phone_message_over_cap_closes_phone_1009() -> None:  # F46
    async with start_relay(f"--max-message-bytes={SMALL_CAP}") as relay:
        b, p, cid = await paired(relay, "s1")
        await p.send(json_string(SMALL_CAP + 1))
        assert await closed_with(p) == (1009, SMALL_CAP_REASON)
        # README §3 decision 1: the notice carries the code the relay sent the phone
        assert await recv_json(b) == {"conn_id": cid, "close_code": 1009}
        await relay.wait_counts(1, 0)
        await relay.wait_log(f"msg=phone_unregistered server_id=s1 conn_id={cid}")
        # the binary is unaffected and serves a new phone
        p2 = await phone(relay, "s1")
        await p2.send("[1]")
        assert (await recv_json(b))["frame"] == [1]


async def test_binary_message_over_cap_closes_binary_1009_and_starts_grace() -> None:  # F46
    async with start_relay(f"--max-message-bytes={SMALL_CAP}") as relay:
        b, p, cid = await paired(relay, "s1")
        env, _ = envelope_of(cid, SMALL_CAP + 1)
        await b.send(env)
        assert await closed_with(b) == (1009, SMALL_CAP_REASON)
        await relay.wait_log("msg=server_released server_id=s1")
        await relay.wait_counts(0, 1)  # in grace: binary not counted, phone still there
        await assert_silent(p, 0.1)  # the over-size envelope was not delivered
        # grace (600 ms) runs out: the phone is torn down with 1000
        assert await closed_with(p) == (1000, "")
        await wait_metric(relay, "pyrycode_relay_grace_expiries_total", 1)


async def test_fragmented_message_cap_counts_the_whole_message() -> None:  # F46
    async with start_relay(f"--max-message-bytes={SMALL_CAP}") as relay:
        b = await binary(relay, "s1")
        raw = await RawWs.connect(relay, "client", "s1")
        await relay.wait_counts(1, 1)
        half = SMALL_CAP // 2
        body = json_string(SMALL_CAP).encode()
        raw.send_frame(0x1, body[:half], fin=False)
        raw.send_frame(0x0, body[half:])
        wrapped = await recv_json(b)
        assert len(wrapped["frame"]) == SMALL_CAP - 2
        # two fragments that together exceed the cap by one byte
        body = json_string(SMALL_CAP + 1).encode()
        raw.send_frame(0x1, body[:half], fin=False)
        raw.send_frame(0x0, body[half:])
        code, reason, data = await raw_read_close(raw)
        assert (code, reason, data) == (1009, SMALL_CAP_REASON, [])
        reply_close(raw, code)
        notice = await recv_json(b)
        assert notice == {"conn_id": wrapped["conn_id"], "close_code": 1009}
        raw.close()


async def test_default_cap_is_262144() -> None:  # F46 (default --max-message-bytes)
    async with start_relay() as relay:
        b, p, cid = await paired(relay, "s1")
        msg = json_string(DEFAULT_CAP)
        await p.send(msg)
        assert await recv(b) == f'{{"conn_id":"{cid}","frame":{msg}}}'
        env, frame = envelope_of(cid, DEFAULT_CAP)
        await b.send(env)
        assert await recv(p) == frame
        await p.send(json_string(DEFAULT_CAP + 1))
        assert await closed_with(p) == (1009, DEFAULT_CAP_REASON)
        assert await recv_json(b) == {"conn_id": cid, "close_code": 1009}
        b2 = await binary(relay, "s2")
        p2 = await phone(relay, "s2")
        await p2.send("{}")
        cid2 = (await recv_json(b2))["conn_id"]
        await b2.send(envelope_of(cid2, DEFAULT_CAP + 1)[0])
        assert await closed_with(b2) == (1009, DEFAULT_CAP_REASON)
        await relay.wait_log("msg=server_released server_id=s2")


# -- per-message read deadline --------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["server", "client"])
async def test_stalled_fragmented_message_is_cut_off(endpoint: str) -> None:  # F47
    async with start_relay("--message-read-timeout=1s") as relay:
        b = await binary(relay, "s1") if endpoint == "client" else None
        raw = await RawWs.connect(relay, endpoint, "s1")
        await relay.wait_counts(1, 1 if b else 0)
        t0 = time.monotonic()
        raw.send_frame(0x1, b'{"a":', fin=False)  # a non-final fragment, then nothing
        code, _, data = await raw_read_close(raw, timeout=4)
        elapsed = time.monotonic() - t0
        reply_close(raw, code)
        assert 0.8 <= elapsed <= 2.5, elapsed
        assert code in (1008, None)  # library-defined (reference §6.1); never delivered
        assert data == []
        if b is not None:
            notice = await recv_json(b)
            assert notice["close_code"] == 1001  # read-deadline expiry → 1001 (§6.3)
            await relay.wait_counts(1, 0)
        else:
            await relay.wait_log("msg=server_released server_id=s1")
        raw.close()


@pytest.mark.parametrize("endpoint", ["server", "client"])
async def test_dribbled_frame_is_cut_off(endpoint: str) -> None:  # F48
    async with start_relay("--message-read-timeout=1s") as relay:
        b = await binary(relay, "s1") if endpoint == "client" else None
        raw = await RawWs.connect(relay, endpoint, "s1")
        frame = encode_frame(0x1, b'{"pad":"' + b"z" * 90 + b'"}')  # declares 100 bytes
        closer = asyncio.create_task(raw_read_close(raw, timeout=5))
        t0 = time.monotonic()
        raw.writer.write(frame[:6])  # header + mask: the message has begun
        sent = 6
        for _ in range(25):  # 1 byte every 200 ms would need 20 s to finish
            done, _ = await asyncio.wait({closer}, timeout=0.2)
            if done:
                break
            raw.writer.write(frame[sent : sent + 1])
            sent += 1
        code, _, data = await closer
        elapsed = time.monotonic() - t0
        raw.close()  # mid-frame a close reply would be read as payload: just hang up
        assert sent < len(frame)
        assert 0.8 <= elapsed <= 2.0, elapsed
        assert code in (1008, None)
        assert data == []
        if b is not None:
            assert (await recv_json(b))["close_code"] == 1001
        raw.close()


async def test_frame_header_then_stall_is_cut_off() -> None:  # F48 (zero dribble rate)
    # "Once the first data-frame header of a message has arrived, the whole message must
    # arrive within the deadline" (§7.3). The heartbeat is set long so only the deadline
    # can close this connection within the window.
    async with start_relay(
        "--message-read-timeout=1s", "--heartbeat-interval=30s", "--heartbeat-timeout=30s"
    ) as relay:
        raw = await RawWs.connect(relay, "server", "s1")
        try:
            await relay.wait_counts(1, 0)
            frame = encode_frame(0x1, b'{"pad":"' + b"z" * 90 + b'"}')
            t0 = time.monotonic()
            raw.writer.write(frame[:6])  # a complete frame header (with mask), no payload
            code, _, _ = await raw_read_close(raw, timeout=3)
            elapsed = time.monotonic() - t0
            assert elapsed <= 2.5, elapsed
            assert code in (1008, None)
        finally:
            raw.close()


async def test_idle_longer_than_deadline_then_message_delivered() -> None:  # F49
    async with start_relay("--message-read-timeout=300ms") as relay:
        b, p, cid = await paired(relay, "s1")
        # idle for twice the deadline on both sides: nothing happens
        await asyncio.gather(assert_silent(b, 0.7), assert_silent(p, 0.7))
        await p.send('{"after":"idle"}')
        assert (await recv_json(b))["frame"] == {"after": "idle"}
        await b.send(f'{{"conn_id":"{cid}","frame":{{"back":1}}}}')
        assert await recv_json(p) == {"back": 1}
        # a raw peer: idle, then a fragmented message completed within the deadline
        raw = await RawWs.connect(relay, "client", "s1")
        await relay.wait_counts(1, 2)
        await assert_silent(b, 0.7)
        raw.send_frame(0x1, b'{"frag', fin=False)
        await asyncio.sleep(0.1)  # part of the scenario: fragments spread over time
        raw.send_frame(0x0, b'":true}')
        assert (await recv_json(b))["frame"] == {"frag": True}
        raw.close()


async def test_phone_held_for_a_congested_binary_is_not_read_timed_out() -> None:  # F49
    """A phone the relay stops reading (its binary's socket is full) is not late: the
    message deadline restarts when reading does, like the reference's per-read deadline.
    Before, a frame the pause cut in half was closed 1008 after --message-read-timeout."""
    quiet = ("--message-read-timeout=500ms", "--write-timeout=10s", "--heartbeat-interval=60s")
    async with start_relay(*quiet) as relay:
        raw = await RawWs.connect(relay, "server", "held")  # reads nothing for now
        await relay.wait_counts(1, 0)
        p = await phone(relay, "held")
        chunk = '{"m":"' + "x" * 65_536 + '"}'
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):  # three deadlines long, paused most of it
                while True:
                    await p.send(chunk)
                    sent += 1
        last = asyncio.create_task(p.send('{"last":1}'))
        got = 0
        async with asyncio.timeout(10):
            while True:
                opcode, payload = await raw.read_frame()
                if opcode == 0x1 and payload.endswith(b'"frame":{"last":1}}'):
                    break
                got += opcode == 0x1
        await last
        assert got in (sent, sent + 1), (got, sent)  # every frame; the phone was never cut
        assert "message read timeout" not in relay.log
        raw.close()


# -- heartbeat -------------------------------------------------------------------------

FAST_HEARTBEAT = ("--heartbeat-interval=200ms", "--heartbeat-timeout=200ms")


async def test_heartbeat_healthy_peers_stay_connected() -> None:  # F50
    async with start_relay(*FAST_HEARTBEAT) as relay:
        # client-side keepalive off: every ping on the wire is the relay's
        b = await binary(relay, "s1", ping_interval=None)
        p = await phone(relay, "s1", ping_interval=None)
        await p.send("[0]")
        cid = (await recv_json(b))["conn_id"]
        raw = await RawWs.connect(relay, "client", "s1")
        await relay.wait_counts(1, 2)
        # about six ping cycles; the raw peer answers each ping by hand
        pings, *_ = await asyncio.gather(
            answer_pings(raw, 1.2), assert_silent(b, 1.2), assert_silent(p, 1.2)
        )
        assert pings >= 4
        await relay.wait_counts(1, 2)
        await p.send("[1]")
        assert (await recv_json(b))["frame"] == [1]
        await b.send(f'{{"conn_id":"{cid}","frame":[2]}}')
        assert await recv_json(p) == [2]
        m = await relay.metrics()
        assert m[hb_series("server")] == m[hb_series("client")] == 0
        raw.close()


@pytest.mark.parametrize("endpoint", ["server", "client"])
async def test_heartbeat_unresponsive_peer_closed_1011(endpoint: str) -> None:  # F51
    async with start_relay(*FAST_HEARTBEAT) as relay:
        b = await binary(relay, "s1") if endpoint == "client" else None
        t0 = time.monotonic()
        raw = await RawWs.connect(relay, endpoint, "s1")  # never reads, never pongs
        await wait_metric(relay, hb_series(endpoint), 1, timeout=3)
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed <= 2.0, elapsed  # interval + timeout = 400 ms
        # reading after the fact: the pings, then the relay's close
        code, reason, data = await raw_read_close(raw)
        assert (code, reason, data) == (1011, "heartbeat timeout", [])
        reply_close(raw, code)
        other = "client" if endpoint == "server" else "server"
        assert (await relay.metrics())[hb_series(other)] == 0
        if b is not None:
            notice = await recv_json(b)
            assert notice["close_code"] == 1011  # README §3 decision 1
            await relay.wait_counts(1, 0)
            await assert_silent(b, 0.5)  # the healthy binary outlives several cycles
        else:
            await relay.wait_log("msg=server_released server_id=s1")
            await relay.wait_counts(0, 0)
        raw.close()


async def test_clean_close_never_shows_1011() -> None:  # F52
    async with start_relay(*FAST_HEARTBEAT) as relay:
        b, p, cid = await paired(relay, "s1")
        await asyncio.gather(assert_silent(b, 0.5), assert_silent(p, 0.5))
        await p.close()
        assert p.close_code == 1000
        assert await recv_json(b) == {"conn_id": cid, "close_code": 1000}
        await b.close()
        assert b.close_code == 1000
        await relay.wait_log("msg=server_released server_id=s1")
        # a raw peer closing cleanly gets its own code echoed, not a heartbeat close
        raw = await RawWs.connect(relay, "server", "s2")
        raw.send_frame(0x8, struct.pack("!H", 1000))
        code, reason, _ = await raw_read_close(raw)
        assert (code, reason) == (1000, "")
        raw.close()
        await asyncio.sleep(0.6)  # bounded window: three heartbeat periods after teardown
        m = await relay.metrics()
        assert m[hb_series("server")] == m[hb_series("client")] == 0
        assert relay.count_log("heartbeat") == 0


# -- slow headers ----------------------------------------------------------------------


async def _stalled_head(relay: Relay, partial: bytes) -> tuple[float, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    t0 = time.monotonic()
    writer.write(partial)
    try:
        async with asyncio.timeout(4):
            data = await reader.read()
    except ConnectionResetError:
        data = b""
    elapsed = time.monotonic() - t0
    writer.close()
    return elapsed, data


async def test_slow_headers_closed_silently() -> None:  # F53
    async with start_relay("--handshake-timeout=500ms") as relay:
        lines_before = len(relay.lines)
        stalled = asyncio.create_task(
            _stalled_head(relay, b"GET /v1/server HTTP/1.1\r\nHost: x\r\n")
        )
        # a well-behaved client is served while the slow one stalls
        b = await binary(relay, "s1")
        await relay.wait_log("msg=server_claimed server_id=s1")
        lines_before += 1
        elapsed, data = await stalled
        assert data == b""  # closed with no bytes (no 408, no 400)
        assert 0.4 <= elapsed <= 1.5, elapsed
        await assert_silent(b, 0.2)  # bounded window for a late log line
        assert len(relay.lines) == lines_before, relay.lines[lines_before:]
        m = await relay.metrics()
        attempts = {k: v for k, v in m.items() if "ws_upgrade_attempts_total" in k and v}
        assert attempts == {
            'pyrycode_relay_ws_upgrade_attempts_total{endpoint="server",outcome="accept"}': 1
        }
        # nothing at all sent after connecting: the same deadline applies
        elapsed, data = await _stalled_head(relay, b"")
        assert data == b""
        assert 0.4 <= elapsed <= 1.5, elapsed
