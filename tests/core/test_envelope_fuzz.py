"""Fuzzing the envelope codec, beyond tests/core/test_envelope.py.

test_envelope.py covers short arbitrary bytes and well-formed envelopes. Here: large
arbitrary inputs, structured near-valid envelopes (every key with every JSON type,
truncated, byte-flipped, spliced), and exact-bytes round trips through the functions the
relay actually chains: the phone's payload `wrap`ped, echoed by a binary unchanged, and
decoded again; close notices with any conn_id decoded back to the same values.
Whatever the input, the only exception that may escape the decoder is EnvelopeError.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyrycode_relay.core.envelope import (
    BinaryEnvelope,
    EnvelopeError,
    close_notice,
    decode_binary_envelope,
    frame_prefix,
    is_json,
    wrap,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)
KEYS = ("conn_id", "frame", "close_code", "push_wake", "token", "Conn_Id", "")

# An envelope-shaped object: any subset of the keys that matter, each with a value of any
# JSON type (and conn_id / close_code also with their plausible types).
near_valid_objects = st.dictionaries(
    st.sampled_from(KEYS),
    json_values | st.text(min_size=1, max_size=12) | st.integers(min_value=-1, max_value=70000),
    max_size=5,
)


def check_decoded(data: bytes) -> BinaryEnvelope | None:
    """Decodes; on success, checks what the relay relies on downstream."""
    try:
        env = decode_binary_envelope(data)
    except EnvelopeError:
        return None
    assert env.close_code is None or 0 <= env.close_code <= 0xFFFF
    if not env.conn_id:
        assert env.is_push_wake  # the only accepted envelope without a conn_id
        return env
    assert isinstance(env.conn_id, str)
    data.decode("utf-8")  # anything routed goes out in a text frame
    if env.has_frame:
        frame = bytes(env.frame)
        assert frame in data  # a span of the input, never re-encoded
        assert is_json(frame)
    else:
        assert env.close_code  # a frameless envelope is a close directive
    return env


@settings(max_examples=300)
@given(st.binary(min_size=64, max_size=4096))
def test_large_arbitrary_bytes_only_envelope_error(data: bytes) -> None:
    check_decoded(data)
    is_json(data)  # never raises


@settings(max_examples=400)
@given(near_valid_objects)
def test_structured_envelopes_decode_consistently(obj: dict[str, Any]) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode()
    env = check_decoded(data)
    conn_id = obj.get("conn_id")
    frame = obj.get("frame")
    code = obj.get("close_code")
    routable = isinstance(conn_id, str) and conn_id != ""
    well_typed_code = code is None or (type(code) is int and 0 <= code <= 0xFFFF)
    if routable and well_typed_code and (frame is not None or code):
        assert env is not None, data  # a valid envelope is never dropped
        assert env.conn_id == conn_id
        if frame is not None:
            assert json.loads(bytes(env.frame)) == frame
    if not well_typed_code:
        assert env is None  # a non-integer or out-of-range close_code is malformed


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> bytes:
    """A valid envelope, then one mutation: truncation, a flipped byte, an inserted or
    deleted byte, or two envelopes spliced together."""
    conn_id = draw(st.text(min_size=1, max_size=10))
    frame = json.dumps(draw(json_values), ensure_ascii=False)
    base = f'{{"conn_id":{json.dumps(conn_id)},"frame":{frame}}}'.encode()
    at = draw(st.integers(min_value=0, max_value=len(base)))
    byte = bytes([draw(st.integers(min_value=0, max_value=255))])
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]))
    if kind == "truncate":
        return base[:at]
    if kind == "flip":
        return base[:at] + byte + base[at + 1 :]
    if kind == "insert":
        return base[:at] + byte + base[at:]
    if kind == "delete":
        return base[:at] + base[at + 1 :]
    return base[:at] + base  # e.g. '{"conn_{"conn_id":…}'


@settings(max_examples=500)
@given(mutated_envelopes())
@example(b'{"conn_id":"\x80","frame":null}')  # found by this test (see below)
def test_mutated_envelopes_only_envelope_error(data: bytes) -> None:
    check_decoded(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"conn_id":"\x80","frame":1}',
        b'{"conn_id":"a\xff","close_code":4401}',
        b'{"push_wake":{"token":"\xc3"},"conn_id":"\xed\xa0\x80"}',
        b'{"\xff":1,"conn_id":"a","frame":1}',
    ],
)
def test_invalid_utf8_inside_strings_is_malformed(data: bytes) -> None:
    # Regression: msgspec raises UnicodeDecodeError for invalid UTF-8 inside a
    # string field it decodes; it escaped the decoder and, from a binary-opcode frame,
    # tore down the binary's connection instead of dropping one envelope (§7.7).
    with pytest.raises(EnvelopeError):
        decode_binary_envelope(data)
    assert not is_json(data)


@settings(max_examples=300)
@given(
    st.text(min_size=1, max_size=40),
    json_values.filter(lambda v: v is not None),  # `"frame":null` means "no frame" (§3.5)
    st.sampled_from([b"", b" ", b"\n\t"]),
)
def test_phone_frame_round_trips_through_an_echoing_binary(
    conn_id: str, value: Any, pad: bytes
) -> None:
    """relay wraps → binary sends the same bytes back → relay decodes: the phone gets
    exactly the bytes it sent (minus insignificant outer whitespace)."""
    payload = pad + json.dumps(value, ensure_ascii=False).encode() + pad
    assert is_json(payload)
    wrapped = wrap(frame_prefix(conn_id), payload)
    env = decode_binary_envelope(wrapped)
    assert env.conn_id == conn_id
    assert bytes(env.frame) == payload.strip(b" \n\t")
    assert not env.close_code


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=40), st.integers(min_value=1, max_value=0xFFFF))
def test_close_notice_round_trips(conn_id: str, code: int) -> None:
    raw = close_notice(conn_id, code)
    decoded = msgspec.json.decode(raw)
    assert decoded == {"conn_id": conn_id, "close_code": code}
    env = decode_binary_envelope(raw)  # a notice echoed back reads as a close directive
    assert (env.conn_id, env.close_code, env.has_frame) == (conn_id, code, False)
