"""The request-head size limit (ADR 0003: 64 KiB → 431), however the head is chunked.

Regression: h11 enforces its limit only while a head is incomplete, so a
140 KiB head arriving in one or two large reads was parsed and routed.
"""

from __future__ import annotations

import pytest

from pyrycode_relay.transport.http import MAX_HEAD_BYTES, HeadReader, HttpError


def head_of(size: int) -> bytes:
    """A complete GET head of exactly `size` bytes."""
    start, end = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("chunk", [1 << 20, 65536, 4096])
def test_head_over_the_limit_is_431_however_it_arrives(chunk: int) -> None:
    data = head_of(MAX_HEAD_BYTES + 1)
    reader = HeadReader()
    with pytest.raises(HttpError) as info:
        for i in range(0, len(data), chunk):
            assert reader.feed(data[i : i + chunk]) is None
    assert info.value.status == 431


@pytest.mark.parametrize("chunk", [1 << 20, 4096])
def test_head_at_the_limit_passes_and_early_frames_do_not_count(chunk: int) -> None:
    early = b"\x81\x85" + b"w" * 100_000  # WebSocket bytes sent right behind the head
    data = head_of(MAX_HEAD_BYTES) + early
    reader = HeadReader()
    head = None
    for i in range(0, len(data), chunk):
        head = head or reader.feed(data[i : i + chunk])
        if head is not None:
            break
    assert head is not None and head.path == "/healthz"
