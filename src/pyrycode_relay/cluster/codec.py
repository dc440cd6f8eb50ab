"""The bus wire format between relay instances (cluster mode).

Owns: message kinds and their field order, and packing a batch of messages for one
destination into one Redis PUBLISH payload (msgpack:
`[version, sender, incarnation, [msg, ...]]`, each msg a list whose first element is its
kind). `version` changes with any incompatible change here; a payload of another version
is refused, never misread, and every instance key names its process's version. Frames
ride as msgpack bin, byte for byte.
Must never: do I/O, or interpret a frame's content.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

# edge (the phone's instance) → owner (the binary's instance)
ADMIT: Final = 1  # [ADMIT, req, server_id, conn_id]
FRAME: Final = 2  # [FRAME, server_id, conn_id, envelope]  (already wrapped by the edge)
GONE: Final = 3  # [GONE, server_id, conn_id, notice_code]  (0: no close notice is due)
# owner → edge
DELIVER: Final = 4  # [DELIVER, conn_id, frame]
DIRECTIVE: Final = 5  # [DIRECTIVE, conn_id, frame or nil, close_code]
EVICT: Final = 6  # [EVICT, conn_id, close_code, reason]
END: Final = 7  # [END, conn_id]  (the frame met no live binary: close the phone 1000)
BYE: Final = 8  # [BYE]  (the owner is leaving: every phone routed to it is orphaned)
PAUSE: Final = 11  # [PAUSE, conn_id]  (the binary's socket is congested: stop reading)
RESUME: Final = 12  # [RESUME, conn_id]  (it drained: read again)
# claimant → owner, and every reply
PROBE: Final = 9  # [PROBE, req, server_id]
REPLY: Final = 10  # [REPLY, req, value]

# PROBE replies
ALIVE: Final = "alive"  # the incumbent answered the ping: the claimant gets 4409
FREE: Final = "free"  # nothing live held it (none, or in grace: reclaimed)
DEAD: Final = "dead"  # the incumbent stayed silent: closed 1011, a takeover

VERSION: Final = 1

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(tuple[int, str, str, list[list[Any]]])


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


def encode_batch(sender: str, incarnation: str, messages: list[tuple[Any, ...]]) -> bytes:
    return _encoder.encode((VERSION, sender, incarnation, messages))


def decode_batch(payload: bytes) -> tuple[str, str, list[list[Any]]]:
    try:
        version, sender, incarnation, messages = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise CodecError(str(exc)) from None
    if version != VERSION:
        raise CodecError(f"bus format version {version}, this relay speaks {VERSION}")
    return sender, incarnation, messages
