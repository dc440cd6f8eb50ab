"""The sessions' decisions in-process: claims, the conflict probe, admission, forwarding,
back-pressure and close notices, on a real Relay with fake connections (no socket, no
process). The e2e suites hold the same behaviour against the real process."""

from __future__ import annotations

import asyncio

from pyrycode_relay.endpoints.server import BinarySession
from tests.fakes import binary, events, make_relay, phone


async def test_a_free_id_is_claimed_and_heartbeats_start() -> None:
    relay, out = make_relay()
    b, conn = binary(relay)
    assert relay.registry.binary("s1") is b
    assert conn.heartbeat and conn.closed is None
    assert events(out) == ["server_claimed"]


async def test_a_live_incumbent_answers_the_probe_and_the_claimant_gets_4409() -> None:
    relay, _ = make_relay()
    first, first_conn = binary(relay)
    _, second_conn = binary(relay)
    assert len(first_conn.pings) == 1 and second_conn.closed is None  # probing
    first_conn.pings.pop()()  # the incumbent's pong
    assert second_conn.closed == (4409, "server-id already claimed")
    assert relay.registry.binary("s1") is first and first_conn.closed is None


async def test_a_silent_incumbent_is_taken_over() -> None:
    relay, out = make_relay("--conflict-probe-timeout=10ms")
    _, first_conn = binary(relay)
    second, _ = binary(relay)
    # The loop runs timers in deadline order: the probe's (10 ms) before this sleep's end.
    await asyncio.sleep(0.05)
    assert first_conn.closed == (1011, "heartbeat timeout")
    assert relay.registry.binary("s1") is second
    assert relay.stats.takeovers == 1
    assert "server_id_takeover" in events(out)


async def test_a_phone_without_a_binary_gets_4404_and_one_at_the_cap_4429() -> None:
    relay, _ = make_relay("--max-phones-per-server=1")
    _, lonely = phone(relay, "nobody")
    assert lonely.closed == (4404, "no server with that id")
    binary(relay)
    _, first_conn = phone(relay)
    _, over = phone(relay)
    assert first_conn.closed is None and over.closed == (4429, "too many phones for server-id")


async def test_frames_cross_as_envelopes_and_back_verbatim() -> None:
    relay, _ = make_relay()
    _, b_conn = binary(relay)
    p, p_conn = phone(relay)
    p.on_message(b'{"hello" : 1}')
    assert b_conn.sent == [b'{"conn_id":"%s","frame":{"hello" : 1}}' % p.conn_id.encode()]
    b = relay.registry.binary("s1")
    assert isinstance(b, BinarySession)
    b.on_message(b'{"conn_id":"%s","frame":{"r" :[2]}}' % p.conn_id.encode())
    assert p_conn.sent == [b'{"r" :[2]}']
    assert relay.stats.frames_phone_to_binary == relay.stats.frames_binary_to_phone == 1


async def test_a_congested_binary_pauses_its_phone_until_it_drains() -> None:
    relay, _ = make_relay()
    b, b_conn = binary(relay)
    p, p_conn = phone(relay)
    b_conn.write_paused = True
    p.on_message(b"{}")
    assert not p_conn.reading  # held while the binary's socket is full
    b_conn.write_paused = False
    b.on_writable()
    assert p_conn.reading


async def test_a_phone_that_leaves_is_announced_once_to_its_binary() -> None:
    relay, out = make_relay()
    _, b_conn = binary(relay)
    p, p_conn = phone(relay)
    p_conn.peer_close_code = 1000
    p_conn.close(1000)
    assert b_conn.messages() == [{"conn_id": p.conn_id, "close_code": 1000}]
    assert relay.registry.phone("s1", p.conn_id) is None
    assert events(out)[-1] == "phone_unregistered"


async def test_a_close_directive_closes_the_phone_without_a_notice() -> None:
    relay, _ = make_relay()
    b, b_conn = binary(relay)
    p, p_conn = phone(relay)
    b.on_message(b'{"conn_id":"%s","frame":{"bye":1},"close_code":4001}' % p.conn_id.encode())
    assert p_conn.sent == [b'{"bye":1}'] and p_conn.closed == (4001, "")
    assert b_conn.sent == []  # directed: no close notice
