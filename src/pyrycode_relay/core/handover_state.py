"""The handover's state blob: what a successor needs besides the descriptors.

Owns: the blob's schema and its format version, encoding (msgpack) and decoding. A successor
reads the version first and refuses a blob of any other version (the old process then keeps
serving), so the schema may change between releases as long as the version changes with it.
Must never: import anything of the relay (transport and endpoints import these types), hold a
secret (a device token is never kept by the relay, so never here) or be logged.
"""

from __future__ import annotations

import msgspec

# Bump on any change to the structs below: a successor refuses any other version.
FORMAT_VERSION = 1

# The kinds of listener (Blob.listeners, ConnState.listener). TLS modes hand over listening
# sockets only: TLS sessions cannot leave the process, so their connections drain.
KIND_MAIN = "main"  # insecure mode's WebSocket listener
KIND_METRICS = "metrics"
KIND_HTTPS = "https"
KIND_ACME = "acme"  # ACME mode's HTTP-01 challenge listener


class HandoverError(Exception):
    """The handover cannot go on; the message is the one log line's `reason`."""


class TimerState(msgspec.Struct, array_like=True, frozen=True):
    """Seconds left on each running timer of a connection at export (None: not running)."""

    tick: float | None = None  # the next heartbeat ping
    pong: float | None = None  # the outstanding heartbeat ping's deadline
    message: float | None = None  # the message being read must complete by then
    write: float | None = None  # the send buffer must drain by then


class WsState(msgspec.Struct, array_like=True, frozen=True):
    """One WebSocket's transport state."""

    write_high: int
    unsent: bytes  # written by the relay, not yet taken by the kernel: goes out first
    rx_tail: bytes  # the raw bytes of a half-received frame (the parser had them)
    unparsed: bytes  # read from the socket, never parsed
    fragments: bytes | None  # the frames so far of a fragmented message
    fragments_text: bool
    reading_paused: bool  # held by the endpoint (back-pressure toward its binary)
    ping_seq: int
    heartbeat_pings: list[bytes]  # payloads of heartbeat pings still unanswered
    timers: TimerState
    age: float = 0.0  # seconds since its 101 (the lifetime histogram and `ws_closed` go on)


class BinaryState(msgspec.Struct, array_like=True, frozen=True):
    conn_id: str
    server_id: str
    binary_version: str
    remote: str
    blocked: list[str]  # conn_ids of the phones paused until this binary's socket drains


class PhoneState(msgspec.Struct, array_like=True, frozen=True):
    conn_id: str
    server_id: str
    device_name: str
    remote: str
    directed: bool
    notice_code: int | None
    outbox: list[tuple[bytes | None, int]]  # queued (frame, close code) items, in order
    inflight: int  # cost of the items handed to the socket layer, not yet written


class ConnState(msgspec.Struct, array_like=True, frozen=True):
    """One connection; its descriptor is the one at the same index in the batches."""

    listener: str  # which listener's router serves it ("main", "metrics")
    peer_host: str
    cap_key: str | None  # the connection-cap slot it holds
    head: bytes | None = None  # still reading its request head: the bytes so far
    ws: WsState | None = None
    binary: BinaryState | None = None
    phone: PhoneState | None = None


class BucketState(msgspec.Struct, array_like=True, frozen=True):
    key: str
    tokens: int
    refill_ago: float
    seen_ago: float


class Blob(msgspec.Struct, frozen=True):
    """The whole blob (a map at the top, so that `format` can be read alone)."""

    format: int
    exported_at: float  # time.monotonic() at export: the clock is system-wide on Linux
    listeners: list[str]  # the kind of each listener descriptor, in order
    conns: list[ConnState]
    graces: dict[str, float]  # server-id in grace (its binary gone) → seconds left
    buckets: list[BucketState]
    counters: dict[str, int]
    uptime: float
    # Listeners only: the old process drains its connections itself (TLS modes), so the
    # successor serves at once instead of waiting for it to be gone.
    drain: bool = False


class _Version(msgspec.Struct):
    format: int


def encode(blob: Blob) -> bytes:
    return msgspec.msgpack.encode(blob)


def decode(data: bytes, expected: int = FORMAT_VERSION) -> Blob:
    """The blob, or HandoverError when it is of another format version or unreadable."""
    try:
        version = msgspec.msgpack.decode(data, type=_Version).format
    except msgspec.DecodeError:
        raise HandoverError("state blob unreadable") from None
    if version != expected:
        raise HandoverError(f"state format {version}, this version reads {expected}")
    try:
        return msgspec.msgpack.decode(data, type=Blob)
    except msgspec.DecodeError:
        raise HandoverError("state blob unreadable") from None
