"""Envelope: exact-bytes wrapping, validation order, and properties over arbitrary input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrycode_relay.core.envelope import (
    ERR_MALFORMED,
    ERR_MISSING_CONN_ID,
    ERR_MISSING_FRAME,
    EnvelopeError,
    close_notice,
    decode_binary_envelope,
    frame_prefix,
    is_json,
    is_legal_close_code,
    wrap,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
whitespace = st.text(alphabet=" \t\r\n", max_size=3)


def encode(value: Any, indent: int | None) -> bytes:
    return json.dumps(value, indent=indent, ensure_ascii=False).encode()


@given(json_values, st.sampled_from([None, 0, 2]), whitespace, whitespace)
def test_any_json_value_is_wrapped_verbatim(
    value: Any, indent: int | None, lead: str, trail: str
) -> None:
    payload = lead.encode() + encode(value, indent) + trail.encode()
    assert is_json(payload)
    wrapped = wrap(frame_prefix("client-s1-0badcafe"), payload)
    assert json.loads(wrapped) == {"conn_id": "client-s1-0badcafe", "frame": value}
    assert payload in wrapped  # not re-encoded: the phone's own bytes, spaces and all


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_and_only_valid_json_passes(data: bytes) -> None:
    if is_json(data):
        data.decode("utf-8")
        json.loads(data)
    try:
        decode_binary_envelope(data)
    except EnvelopeError as exc:
        assert str(exc) in (ERR_MALFORMED, ERR_MISSING_CONN_ID, ERR_MISSING_FRAME)


@given(json_values.filter(lambda v: v is not None), st.sampled_from([None, 0, 2]), st.text())
def test_binary_frame_span_is_exact(value: Any, indent: int | None, conn_id: str) -> None:
    frame = encode(value, indent)
    data = b'{"conn_id":' + json.dumps(conn_id).encode() + b',"frame":' + frame + b"}"
    if not conn_id:
        with pytest.raises(EnvelopeError, match=ERR_MISSING_CONN_ID):
            decode_binary_envelope(data)
        return
    env = decode_binary_envelope(data)
    assert env.conn_id == conn_id
    assert bytes(env.frame) == frame.strip()
    assert env.has_frame and not env.close_code


@pytest.mark.parametrize(
    ("data", "err"),
    [
        (b"not-json", ERR_MALFORMED),
        (b"[]", ERR_MALFORMED),
        (b'{"conn_id":"a","frame":1} trailing', ERR_MALFORMED),
        (b'{"conn_id":1,"frame":1}', ERR_MALFORMED),
        (b'{"conn_id":"a","close_code":-1}', ERR_MALFORMED),
        (b'{"conn_id":"a","close_code":70000}', ERR_MALFORMED),
        (b'{"conn_id":"a","close_code":4401.0}', ERR_MALFORMED),
        (b'{"conn_id":"a","frame":"\xff"}', ERR_MALFORMED),
        (b'{"conn_id":"\xff","frame":1}', ERR_MALFORMED),  # msgspec: UnicodeDecodeError
        (b'{"conn_id":"a","frame":1,"x":"\xff"}', ERR_MALFORMED),
        (b"{}", ERR_MISSING_CONN_ID),
        (b'{"conn_id":""}', ERR_MISSING_CONN_ID),
        (b'{"conn_id":null,"frame":{}}', ERR_MISSING_CONN_ID),
        (b'{"push_wake":null}', ERR_MISSING_CONN_ID),
        (b'{"frame":null,"close_code":4401}', ERR_MISSING_CONN_ID),
        (b'{"conn_id":"a"}', ERR_MISSING_FRAME),
        (b'{"conn_id":"a","frame":null}', ERR_MISSING_FRAME),
        (b'{"conn_id":"a","frame":null,"close_code":0}', ERR_MISSING_FRAME),
        (b'{"conn_id":"a","close_code":null}', ERR_MISSING_FRAME),
    ],
)
def test_rejections_in_reference_order(data: bytes, err: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        decode_binary_envelope(data)
    assert str(info.value) == err


def test_directives_and_push_wake() -> None:
    env = decode_binary_envelope(b'{"conn_id":"a","frame":null,"close_code":4401}')
    assert (env.conn_id, env.has_frame, env.close_code) == ("a", False, 4401)
    env = decode_binary_envelope(b'{"conn_id":"a","close_code":4401,"frame":{"e":1}}')
    assert (bytes(env.frame), env.close_code) == (b'{"e":1}', 4401)
    env = decode_binary_envelope(b'{"push_wake":{"platform":"fcm","token":"T"},"frame":1}')
    assert env.is_push_wake and not env.conn_id
    # conn_id plus push_wake: an ordinary routed frame
    env = decode_binary_envelope(b'{"conn_id":"a","frame":1,"push_wake":{"token":"T"}}')
    assert not env.is_push_wake and bytes(env.frame) == b"1"
    # unknown keys (the deprecated v1 token) are ignored; a repeated key: last wins
    env = decode_binary_envelope(b'{"token":"x","conn_id":"a","conn_id":"b","frame":[]}')
    assert env.conn_id == "b"


@pytest.mark.parametrize("payload", [b"", b"   ", b"not json", b"{", b'{"a":1}{}', b"NaN", b"\xff"])
def test_phone_payload_rejections(payload: bytes) -> None:
    assert not is_json(payload)


def test_close_notice_has_no_frame_key() -> None:
    raw = close_notice('client-"s"-01234567', 1001)
    assert raw == b'{"conn_id":"client-\\"s\\"-01234567","close_code":1001}'
    assert json.loads(raw) == {"conn_id": 'client-"s"-01234567', "close_code": 1001}


@pytest.mark.parametrize(
    ("code", "legal"),
    [
        (999, False),
        (1000, True),
        (1003, True),
        (1004, False),
        (1005, False),
        (1006, False),
        (1007, True),
        (1014, True),
        (1015, False),
        (2999, False),
        (3000, True),
        (4999, True),
        (5000, False),
    ],
)
def test_legal_close_codes(code: int, legal: bool) -> None:
    assert is_legal_close_code(code) is legal
