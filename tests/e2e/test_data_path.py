"""Conformance §15 C: data path, envelope and ordering (scenarios 20-34), plus README §3
decision 3 (illegal directive close codes) and the push-wake refusal while push is off."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.e2e.harness import (
    Relay,
    assert_silent,
    binary,
    closed_with,
    paired,
    phone,
    recv,
    recv_json,
    start_relay,
)


def envelope(conn_id: str, frame: str) -> str:
    """`{"conn_id":…,"frame":<frame>}` with `frame` embedded verbatim: what the binary
    sends to route a frame, and exactly what it must receive for a phone's frame."""
    return f'{{"conn_id":"{conn_id}","frame":{frame}}}'


async def join(relay: Relay, b: ClientConnection, server_id: str) -> tuple[ClientConnection, str]:
    """Another phone on `server_id`, its conn_id learned from a first frame via `b`."""
    p = await phone(relay, server_id)
    await p.send('{"hello":1}')
    env = await recv_json(b)
    assert env["frame"] == {"hello": 1}
    return p, env["conn_id"]


async def recv_text(ws: ClientConnection) -> str:
    msg = await recv(ws)
    assert isinstance(msg, str), f"expected a text frame, got {msg!r}"
    return msg


async def wait_log_count(relay: Relay, needle: str, n: int) -> None:
    """Polls (at most 3 s) until `n` log lines contain `needle`; fails on more or fewer."""
    seen = 0
    for _ in range(150):
        seen = relay.count_log(needle)
        if seen >= n:
            break
        await asyncio.sleep(0.02)
    assert seen == n, f"{seen} lines with {needle!r}, expected {n}"


PHONE_FRAMES = [
    '{"a":{"b":{"c":[1,{"d":null}]}},"e":null,"f":[[],[[]],{}]}',
    '[1,"two",[3,[4,null]],{"k":[]},true,false,-0.5e3]',
    '{"msg":"Grüße, 世界 🚀 — ünïcødé","esc":"\\u00e9\\n\\"q\\""}',
    '{"a" : [1, 2]}',
    '"a bare string"',
    "null",
]


async def test_phone_to_binary_content_and_bytes_unchanged() -> None:  # C20
    async with start_relay() as relay:
        b, p, cid = await paired(relay, "s1")
        for frame in PHONE_FRAMES:
            await p.send(frame)
        for frame in PHONE_FRAMES:
            raw = await recv_text(b)
            env = json.loads(raw)
            assert env["conn_id"] == cid
            assert env["frame"] == json.loads(frame)
            # Our stronger guarantee: the phone's bytes, whitespace included, verbatim.
            assert raw == envelope(cid, frame)
        await assert_silent(b, 0.1)


async def test_outbound_opcode_is_text_both_ways() -> None:  # C21, C33
    async with start_relay() as relay:
        b, p, cid = await paired(relay, "s1")
        # A binary-opcode frame from the phone is forwarded (33) in a text frame (21).
        await p.send(b'{"bin":[1,2]}')
        assert await recv_text(b) == envelope(cid, '{"bin":[1,2]}')
        # A binary-opcode envelope from the binary still reaches the phone as text.
        await b.send(envelope(cid, '{"to":"phone"}').encode())
        assert await recv_text(p) == '{"to":"phone"}'
        await b.send(envelope(cid, '{"again":true}'))
        assert await recv_text(p) == '{"again":true}'
        # A close notice is text too.
        await p.close()
        assert await recv_text(b) == f'{{"conn_id":"{cid}","close_code":1000}}'


async def test_binary_to_phone_routes_bare_frame_to_addressed_phone_only() -> None:  # C22
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        p2, _ = await join(relay, b, "s1")
        # Spaces inside the frame and around the envelope's keys: the phone gets exactly
        # the frame value's bytes.
        await b.send(f'{{ "conn_id" : "{cid1}" , "frame" :  {{"x" :  [1, 2] , "y":"z"}}  }}')
        assert await recv_text(p1) == '{"x" :  [1, 2] , "y":"z"}'
        await b.send(envelope(cid1, '"abc"'))
        got = await recv_text(p1)
        assert got == '"abc"' and len(got.encode()) == 5
        await b.send(envelope(cid1, '{"t":"ünï ☃ 日本"}'))
        assert await recv_text(p1) == '{"t":"ünï ☃ 日本"}'
        await b.send(envelope(cid1, "[ 1 ,2 ]"))
        assert await recv_text(p1) == "[ 1 ,2 ]"
        await assert_silent(p2)
        await assert_silent(p1, 0.05)


async def test_several_phones_each_get_their_own() -> None:  # C23
    async with start_relay() as relay:
        b = await binary(relay, "s1")
        phones = [await join(relay, b, "s1") for _ in range(4)]
        assert len({cid for _, cid in phones}) == 4
        for round_ in range(3):
            for i, (_, cid) in enumerate(phones):
                await b.send(envelope(cid, f'{{"for":{i},"round":{round_}}}'))
        for i, (p, _) in enumerate(phones):
            for round_ in range(3):
                assert await recv_text(p) == f'{{"for":{i},"round":{round_}}}'
        for p, _ in phones:
            await assert_silent(p, 0.1)


async def test_unknown_conn_id_dropped_binary_stays() -> None:  # C24
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        await b.send(envelope("client-s1-deadbeef", '{"lost":1}'))
        await b.send(envelope(cid1, '{"found":2}'))
        assert await recv_text(p1) == '{"found":2}'
        line = await relay.wait_log("msg=binary_forwarder_unknown_conn_id")
        assert "server_id=s1" in line and "conn_id=client-s1-deadbeef" in line
        await assert_silent(b, 0.1)
        await relay.wait_counts(1, 1)
        await assert_silent(p1, 0.05)


async def test_malformed_envelopes_dropped_binary_stays() -> None:  # C25
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        bad = [
            "not-json",
            "[]",
            '{"frame":{}}',
            '{"conn_id":""}',
            f'{{"conn_id":"{cid1}"}}',
            f'{{"conn_id":"{cid1}","frame":null}}',
            f'{{"conn_id":"{cid1}","frame":{{"bad":1}},"close_code":4401.0}}',
            f'{{"conn_id":"{cid1}","frame":{{"bad":2}},"close_code":-1}}',
            f'{{"conn_id":"{cid1}","frame":{{"bad":3}},"close_code":70000}}',
            f'{{"conn_id":"{cid1}","close_code":4401.0}}',
            f'{{"conn_id":"{cid1}","frame":{{"bad":4}}}} trailing',
            '{"conn_id":42,"frame":{"bad":5}}',
        ]
        for message in bad:
            await b.send(message)
        await b.send(envelope(cid1, '{"ok":true}'))
        assert await recv_text(p1) == '{"ok":true}'
        await assert_silent(p1, 0.2)
        await wait_log_count(relay, "msg=binary_forwarder_unmarshal_err", len(bad))
        await assert_silent(b, 0.05)
        await relay.wait_counts(1, 1)


@pytest.mark.parametrize("frame_part", [',"frame":null', ""], ids=["frame-null", "no-frame"])
async def test_close_directive_without_frame(frame_part: str) -> None:  # C26, D38
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        p2, cid2 = await join(relay, b, "s1")
        await b.send(f'{{"conn_id":"{cid1}"{frame_part},"close_code":4401}}')
        assert await closed_with(p1) == (4401, "")
        await b.send(envelope(cid2, '{"still":"here"}'))
        assert await recv_text(p2) == '{"still":"here"}'
        await relay.wait_counts(1, 1)
        await assert_silent(b)  # no close notice for a binary-requested close
        line = await relay.wait_log("msg=binary_forwarder_phone_closed")
        assert f"conn_id={cid1}" in line and "close_code=4401" in line


async def test_close_directive_with_frame() -> None:  # C27
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        frame = '{"type":"error", "code":"auth.invalid_token"}'
        await b.send(f'{{"conn_id":"{cid1}","frame":{frame},"close_code":4401}}')
        assert await recv_text(p1) == frame
        assert await closed_with(p1) == (4401, "")
        await relay.wait_counts(1, 0)
        await assert_silent(b)


async def test_frames_before_directive_flushed_nothing_after() -> None:  # C28
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        await b.send(envelope(cid1, '{"f":1}'))
        await b.send(envelope(cid1, '{"f":2}'))
        await b.send(f'{{"conn_id":"{cid1}","frame":{{"f":3}},"close_code":4401}}')
        await b.send(envelope(cid1, '{"f":4}'))
        assert [await recv_text(p1) for _ in range(3)] == ['{"f":1}', '{"f":2}', '{"f":3}']
        assert await closed_with(p1) == (4401, "")  # fails if f4 arrives first
        await relay.wait_counts(1, 0)
        await assert_silent(b, 0.1)


async def test_directive_without_conn_id_dropped() -> None:  # C29
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        await b.send('{"frame":null,"close_code":4401}')
        await b.send('{"conn_id":null,"frame":{"x":1},"close_code":4401}')
        await b.send(envelope(cid1, '{"alive":1}'))
        assert await recv_text(p1) == '{"alive":1}'
        await wait_log_count(relay, "msg=binary_forwarder_unmarshal_err", 2)
        assert relay.count_log('err="relay: routing envelope missing conn_id"') == 2
        await assert_silent(p1, 0.2)
        await relay.wait_counts(1, 1)


async def test_other_server_ids_phone_cannot_be_addressed() -> None:  # C30
    async with start_relay() as relay:
        b1 = await binary(relay, "s1")
        b2, q, qid = await paired(relay, "s2")
        await b1.send(envelope(qid, '{"cross":1}'))
        await b1.send(f'{{"conn_id":"{qid}","close_code":4401}}')
        line = await relay.wait_log("msg=binary_forwarder_unknown_conn_id")
        assert "server_id=s1" in line and f"conn_id={qid}" in line
        await wait_log_count(relay, "msg=binary_forwarder_unknown_conn_id", 2)
        await assert_silent(q)
        await b2.send(envelope(qid, '{"own":2}'))
        assert await recv_text(q) == '{"own":2}'
        await relay.wait_counts(2, 1)


@pytest.mark.parametrize("bad", ["not json", ""], ids=["not-json", "empty"])
async def test_phone_bad_payload_closes_phone_only(bad: str) -> None:  # C31, C32
    async with start_relay() as relay:
        b = await binary(relay, "s1")
        p = await phone(relay, "s1")
        await p.send('{"first":1}')
        await p.send(bad)
        with contextlib.suppress(websockets.ConnectionClosed):
            await p.send('{"third":3}')
        assert await closed_with(p) == (1000, "")
        first = json.loads(await recv_text(b))
        assert first["frame"] == {"first": 1}
        cid = first["conn_id"]
        assert await recv_text(b) == f'{{"conn_id":"{cid}","close_code":1001}}'
        await assert_silent(b)
        await relay.wait_counts(1, 0)
        line = await relay.wait_log("msg=phone_forwarder_marshal_err")
        assert f"conn_id={cid}" in line


async def test_phone_frame_during_grace_closes_phone_delivers_nowhere() -> None:  # C34
    async with start_relay("--grace-period=2s") as relay:
        b, p, _ = await paired(relay, "s1")
        await b.close()
        await relay.wait_counts(0, 1)  # binary in grace, phone still registered
        await p.send('{"during":"grace"}')
        assert await closed_with(p) == (1000, "")
        await relay.wait_counts(0, 0)
        # A binary reclaiming the slot within the grace window does not get the frame.
        b2 = await binary(relay, "s1")
        await relay.wait_counts(1, 0)
        await assert_silent(b2)


@pytest.mark.parametrize("code", [1005, 999, 2000, 5000, 1004, 1006, 1015, 2999, 65535])
async def test_directive_illegal_close_code_becomes_1011(code: int) -> None:  # README §3 d3
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        await b.send(f'{{"conn_id":"{cid1}","close_code":{code}}}')
        assert (await closed_with(p1))[0] == 1011
        line = await relay.wait_log("msg=binary_forwarder_bad_close_code")
        assert f"conn_id={cid1}" in line and f"close_code={code}" in line
        await relay.wait_counts(1, 0)
        await assert_silent(b, 0.1)


@pytest.mark.parametrize("code", [1000, 3000, 4999])
async def test_directive_legal_edge_close_codes_pass_through(code: int) -> None:  # C26, d3
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        await b.send(f'{{"conn_id":"{cid1}","frame":null,"close_code":{code}}}')
        assert await closed_with(p1) == (code, "")
        await relay.wait_counts(1, 0)
        assert relay.count_log("binary_forwarder_bad_close_code") == 0


async def test_push_wake_dropped_when_push_off() -> None:  # §3.5 push_wake, §12 step 1
    marker = "fcm-device-tok-Zq81xPWmarker"
    async with start_relay() as relay:
        b, p1, cid1 = await paired(relay, "s1")
        await b.send(f'{{"push_wake":{{"platform":"fcm","token":"{marker}"}}}}')
        line = await relay.wait_log("msg=binary_forwarder_push_wake_dropped")
        assert 'err="relay: push is off"' in line and "server_id=s1" in line
        await b.send(envelope(cid1, '{"after":"wake"}'))
        assert await recv_text(p1) == '{"after":"wake"}'
        await assert_silent(p1, 0.1)
        await relay.wait_counts(1, 1)
    assert marker not in relay.log  # checked after every line of stderr has been read
