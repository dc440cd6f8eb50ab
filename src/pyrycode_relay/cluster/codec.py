"""The bus wire format between relay instances (cluster mode).

Owns: the messages (typed: one class per kind, fields in wire order), and packing a batch of
them for one destination into one Redis PUBLISH payload (msgpack:
`[version, sender, incarnation, [msg, ...]]`, each msg a list whose first element is its
kind). `version` changes with any incompatible change here; a payload of another version
is refused, never misread, and every instance key names its process's version. Frames
ride as msgpack bin, byte for byte.
Must never: do I/O, or interpret a frame's content.
"""

from __future__ import annotations

from typing import Final

import msgspec


class _Message(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A bus message: on the wire `[kind, field, ...]`, kind being the class's tag."""


# edge (the phone's instance) → owner (the binary's instance)


class Admit(_Message, frozen=True, tag=1):
    req: int
    server_id: str
    conn_id: str


class Frame(_Message, frozen=True, tag=2):
    server_id: str
    conn_id: str
    envelope: bytes  # already wrapped by the edge


class Gone(_Message, frozen=True, tag=3):
    server_id: str
    conn_id: str
    notice_code: int  # 0: no close notice is due


# owner → edge


class Deliver(_Message, frozen=True, tag=4):
    conn_id: str
    frame: bytes


class Directive(_Message, frozen=True, tag=5):
    conn_id: str
    frame: bytes | None
    close_code: int


class Evict(_Message, frozen=True, tag=6):
    conn_id: str
    close_code: int
    reason: str


class End(_Message, frozen=True, tag=7):
    """The frame met no live binary: close the phone 1000."""

    conn_id: str


class Bye(_Message, frozen=True, tag=8):
    """The owner is leaving: every phone routed to it is orphaned."""


class Pause(_Message, frozen=True, tag=11):
    """The binary's socket is congested: stop reading the phone."""

    conn_id: str


class Resume(_Message, frozen=True, tag=12):
    """It drained: read the phone again."""

    conn_id: str


# claimant → owner, and every reply


class Probe(_Message, frozen=True, tag=9):
    req: int
    server_id: str


class Reply(_Message, frozen=True, tag=10):
    req: int
    value: str | None


Message = (
    Admit | Frame | Gone | Deliver | Directive | Evict | End | Bye | Pause | Resume | Probe | Reply
)
ToPhone = Deliver | Directive | Evict | End | Pause | Resume  # addressed to a phone at the edge


def carried_bytes(msg: Message) -> int:
    """The frame bytes a message carries (what the bus queue counts against its limit)."""
    if isinstance(msg, Frame):
        return len(msg.envelope)
    if isinstance(msg, Deliver):
        return len(msg.frame)
    if isinstance(msg, Directive) and msg.frame is not None:
        return len(msg.frame)
    return 0


# PROBE replies
ALIVE: Final = "alive"  # the incumbent answered the ping: the claimant gets 4409
FREE: Final = "free"  # nothing live held it (none, or in grace: reclaimed)
DEAD: Final = "dead"  # the incumbent stayed silent: closed 1011, a takeover

VERSION: Final = 1

_encoder = msgspec.msgpack.Encoder()
_header = msgspec.msgpack.Decoder(tuple[int, str, str, msgspec.Raw])
_messages = msgspec.msgpack.Decoder(list[Message])


class CodecError(ValueError):
    pass


def process_token(version: int, random_hex: str) -> str:
    """The process part of an instance key's value, `b<version>-<hex>.` (the epoch follows):
    it names the bus format the process speaks, so a claimant can tell an owner it cannot
    talk to from one that is silent."""
    return f"b{version}-{random_hex}."


def speaks_our_format(incarnation: str) -> bool:
    return incarnation.startswith(f"b{VERSION}-")


def channel(instance_id: str) -> str:
    return f"pyrycode-relay:inst:{instance_id}"


def encode_batch(sender: str, incarnation: str, messages: list[Message]) -> bytes:
    return _encoder.encode((VERSION, sender, incarnation, messages))


def decode_batch(payload: bytes) -> tuple[str, str, list[Message]]:
    """The header first: a payload of another version is named as such, not misread."""
    try:
        version, sender, incarnation, raw = _header.decode(payload)
        if version != VERSION:
            raise CodecError(f"bus format version {version}, this relay speaks {VERSION}")
        messages = _messages.decode(raw)
    except msgspec.DecodeError as exc:
        raise CodecError(str(exc)) from None
    return sender, incarnation, messages
