"""The cluster bus's wire format: a batch survives encoding byte for byte, and anything
that is not one of ours is refused rather than misread."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrycode_relay.cluster import codec
from pyrycode_relay.cluster.bus import PUBLISH_BYTES, _batches


@given(frames=st.lists(st.binary(max_size=300), max_size=20))
def test_batch_round_trips_frames_exactly(frames: list[bytes]) -> None:
    messages: list[tuple[Any, ...]] = [
        (codec.DELIVER, f"client-s-{i:08x}", f) for i, f in enumerate(frames)
    ]
    messages.append((codec.DIRECTIVE, "client-s-1", None, 4000))
    messages.append((codec.BYE,))
    sender, incarnation, decoded = codec.decode_batch(codec.encode_batch("i1", "tok", messages))
    assert (sender, incarnation) == ("i1", "tok")
    assert [tuple(m) for m in decoded] == messages
    assert all(isinstance(m[2], bytes) for m in decoded[: len(frames)])


@pytest.mark.parametrize("payload", [b"", b"hello", b"\x93\xa2i1", b"\x92\xa2i1\xa1t"])
def test_foreign_payload_is_refused(payload: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_batch(payload)


def test_other_bus_version_is_refused_not_misread() -> None:
    payload = msgspec.msgpack.encode((codec.VERSION + 1, "i1", "tok", [[codec.BYE]]))
    with pytest.raises(codec.CodecError, match="version 2"):
        codec.decode_batch(payload)


def test_channel_names_the_instance() -> None:
    assert codec.channel("eu-1") == "pyrycode-relay:inst:eu-1"


def test_batches_keep_order_and_split_by_size() -> None:
    big = b"x" * (PUBLISH_BYTES // 2)
    messages = [(codec.FRAME, "s", f"c{i}", big) for i in range(5)]
    batches = _batches(messages)
    assert [m for batch in batches for m in batch] == messages
    assert len(batches) == 3  # two frames fill a publish; the fifth goes alone
    assert _batches([]) == []
