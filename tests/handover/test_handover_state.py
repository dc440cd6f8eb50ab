"""The handover blob: a successor reads its format version first and refuses any other."""

from __future__ import annotations

import msgspec
import pytest

from pyrycode_relay.core.handover_state import (
    FORMAT_VERSION,
    Blob,
    BucketState,
    ConnState,
    HandoverError,
    PhoneState,
    TimerState,
    WsState,
    decode,
    encode,
)


def blob(version: int = FORMAT_VERSION) -> Blob:
    ws = WsState(
        write_high=0,
        unsent=b"\x81\x02{}",
        rx_tail=b"\x81",
        unparsed=b"",
        fragments=None,
        fragments_text=False,
        reading_paused=False,
        ping_seq=3,
        heartbeat_pings=[b"3"],
        timers=TimerState(tick=12.5, pong=4.0),
    )
    phone = PhoneState(
        conn_id="client-s1-0a0b0c0d",
        server_id="s1",
        device_name="Pixel",
        remote="10.0.0.1",
        directed=False,
        notice_code=None,
        outbox=[(b'{"a":1}', 0), (None, 4000)],
        inflight=70,
    )
    return Blob(
        format=version,
        exported_at=123.0,
        listeners=["main", "metrics"],
        conns=[ConnState("main", "10.0.0.1", "10.0.0.1", ws=ws, phone=phone)],
        graces={"s2": 1.5},
        buckets=[BucketState("10.0.0.1", 3, 1.0, 0.5)],
        counters={"frames_phone_to_binary": 7},
        uptime=99.0,
    )


def test_round_trip() -> None:
    assert decode(encode(blob())) == blob()


def test_another_format_version_is_refused_with_both_numbers() -> None:
    with pytest.raises(HandoverError, match="state format 1, this version reads 2"):
        decode(encode(blob()), expected=2)
    # A blob of a future version whose shape this version cannot even parse: refused by its
    # version before its shape is looked at.
    future = msgspec.msgpack.encode({"format": 9, "something": ["else"]})
    with pytest.raises(HandoverError, match="state format 9"):
        decode(future)


@pytest.mark.parametrize("data", [b"", b"\xc1", msgspec.msgpack.encode({"format": 1})])
def test_unreadable_blobs_are_refused(data: bytes) -> None:
    with pytest.raises(HandoverError, match="unreadable"):
        decode(data)
