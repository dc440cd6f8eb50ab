"""The routing envelope, both directions, as exact bytes.

Owns: validating a phone's payload as JSON, wrapping it as
`{"conn_id":…,"frame":<payload>}`, building close notices, and decoding the binary's
envelopes into (conn_id, frame span, close_code) or a push-wake request.
Must never: decode and re-encode a frame. Frames are carried as the exact byte spans the
sender wrote (msgspec.Raw), so the relay stays opaque to what it routes (reference §3.7).
"""

from __future__ import annotations

import msgspec

# Sentinel error texts (reference Appendix A.9); they reach the logs as `err`.
ERR_NOT_JSON = "relay: frame is not valid JSON"
ERR_MALFORMED = "relay: malformed routing envelope"
ERR_MISSING_CONN_ID = "relay: routing envelope missing conn_id"
ERR_MISSING_FRAME = "relay: routing envelope missing frame"

_NO_VALUE = msgspec.Raw(b"")
_NULL = b"null"


class EnvelopeError(ValueError):
    """A binary envelope the relay drops; `str(err)` is one of the sentinel texts."""


class BinaryEnvelope(msgspec.Struct, gc=False):
    """What the binary sends. Unknown keys (e.g. the deprecated `token`) are ignored."""

    conn_id: str | None = None
    frame: msgspec.Raw = _NO_VALUE
    close_code: int | None = None
    push_wake: msgspec.Raw = _NO_VALUE

    @property
    def has_frame(self) -> bool:
        """`frame` present and not JSON null (a directive may carry `"frame":null`)."""
        frame = self.frame
        return len(frame) != 0 and bytes(frame) != _NULL

    @property
    def is_push_wake(self) -> bool:
        return not self.conn_id and len(self.push_wake) != 0 and bytes(self.push_wake) != _NULL


_decode_envelope = msgspec.json.Decoder(BinaryEnvelope).decode
_decode_raw = msgspec.json.Decoder(msgspec.Raw).decode
_encode = msgspec.json.encode


def is_utf8(data: bytes) -> bool:
    """True if `data` is valid UTF-8. Everything the relay sends is a text frame."""
    if data.isascii():  # the common case, and much cheaper than decoding
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def is_json(data: bytes) -> bool:
    """The phone-side check (reference §3.2): one JSON value, UTF-8, nothing after it.

    msgspec skips the value without building objects; it does not check UTF-8, so we do.
    """
    try:
        _decode_raw(data)
    except msgspec.DecodeError:
        return False
    return is_utf8(data)


def frame_prefix(conn_id: str) -> bytes:
    """`{"conn_id":"<id>","frame":` — computed once per phone, reused for every frame."""
    return b'{"conn_id":' + _encode(conn_id) + b',"frame":'


def wrap(prefix: bytes, payload: bytes) -> bytes:
    """The phone's payload embedded verbatim behind its precomputed prefix."""
    return b"".join((prefix, payload, b"}"))


def close_notice(conn_id: str, close_code: int) -> bytes:
    """`{"conn_id":"<id>","close_code":N}` — no `frame` key at all (reference §3.4)."""
    return b'{"conn_id":' + _encode(conn_id) + b',"close_code":' + str(close_code).encode() + b"}"


def decode_binary_envelope(data: bytes) -> BinaryEnvelope:
    """Decode and validate one binary message, in the reference's order (§3.5).

    Returns a routed frame / close directive (conn_id set) or a push-wake request
    (`is_push_wake`). Raises EnvelopeError for everything the relay drops.
    """
    try:
        env = _decode_envelope(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a string it decodes
        # (e.g. conn_id); a binary-opcode frame can carry that (text frames are checked
        # by the transport), and it must be dropped like any malformed envelope (§7.7).
        raise EnvelopeError(ERR_MALFORMED) from None
    code = env.close_code
    if code is not None and not 0 <= code <= 0xFFFF:
        raise EnvelopeError(ERR_MALFORMED)
    if not env.conn_id:
        if env.is_push_wake:
            return env
        raise EnvelopeError(ERR_MISSING_CONN_ID)
    if not code and not env.has_frame:
        raise EnvelopeError(ERR_MISSING_FRAME)
    if not is_utf8(data):
        # The frame is forwarded in a text frame; invalid UTF-8 would break the phone.
        raise EnvelopeError(ERR_MALFORMED)
    return env


def is_legal_close_code(code: int) -> bool:
    """Codes RFC 6455 allows on the wire (README §3 decision 3)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
