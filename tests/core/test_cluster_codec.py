"""The cluster bus's wire format: a batch survives encoding byte for byte, and anything
that is not one of ours is refused rather than misread."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrycode_relay.cluster import codec
from pyrycode_relay.cluster.bus import PUBLISH_BYTES, _batches


@given(frames=st.lists(st.binary(max_size=300), max_size=20))
def test_batch_round_trips_frames_exactly(frames: list[bytes]) -> None:
    messages: list[codec.Message] = [
        codec.Deliver(f"client-s-{i:08x}", f) for i, f in enumerate(frames)
    ]
    messages.append(codec.Directive("client-s-1", None, 4000))
    messages.append(codec.Bye())
    sender, incarnation, decoded = codec.decode_batch(codec.encode_batch("i1", "tok", messages))
    assert (sender, incarnation) == ("i1", "tok")
    assert decoded == messages
    assert all(isinstance(m, codec.Deliver) for m in decoded[: len(frames)])


def test_a_message_is_its_kind_then_its_fields_on_the_wire() -> None:
    # The bus format is `[kind, field, ...]` per message; the kinds' numbers are the format.
    wire = [
        (codec.Admit(7, "s", "c"), [1, 7, "s", "c"]),
        (codec.Frame("s", "c", b"e"), [2, "s", "c", b"e"]),
        (codec.Gone("s", "c", 1001), [3, "s", "c", 1001]),
        (codec.Deliver("c", b"f"), [4, "c", b"f"]),
        (codec.Directive("c", None, 4000), [5, "c", None, 4000]),
        (codec.Evict("c", 4404, "r"), [6, "c", 4404, "r"]),
        (codec.End("c"), [7, "c"]),
        (codec.Bye(), [8]),
        (codec.Probe(9, "s"), [9, 9, "s"]),
        (codec.Reply(9, "alive"), [10, 9, "alive"]),
        (codec.Pause("c"), [11, "c"]),
        (codec.Resume("c"), [12, "c"]),
    ]
    for message, fields in wire:
        assert msgspec.msgpack.encode(message) == msgspec.msgpack.encode(fields), message


def test_a_message_of_an_unknown_kind_or_shape_is_refused() -> None:
    for bad in ([[99, "c"]], [[4, "c"]], [[4, 5, b"f"]]):
        payload = msgspec.msgpack.encode((codec.VERSION, "i1", "tok", bad))
        with pytest.raises(codec.CodecError):
            codec.decode_batch(payload)


@pytest.mark.parametrize("payload", [b"", b"hello", b"\x93\xa2i1", b"\x92\xa2i1\xa1t"])
def test_foreign_payload_is_refused(payload: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_batch(payload)


def test_other_bus_version_is_refused_not_misread() -> None:
    payload = msgspec.msgpack.encode((codec.VERSION + 1, "i1", "tok", [[99, "from the future"]]))
    with pytest.raises(codec.CodecError, match="version 2"):
        codec.decode_batch(payload)


def test_channel_names_the_instance() -> None:
    assert codec.channel("eu-1") == "pyrycode-relay:inst:eu-1"


def test_batches_keep_order_and_split_by_size() -> None:
    big = b"x" * (PUBLISH_BYTES // 2)
    messages: list[codec.Message] = [codec.Frame("s", f"c{i}", big) for i in range(5)]
    batches = _batches(messages)
    assert [m for batch in batches for m in batch] == messages
    assert len(batches) == 3  # two frames fill a publish; the fifth goes alone
    assert _batches([]) == []
