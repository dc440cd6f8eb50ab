"""One TCP connection: an HTTP request head, then (maybe) a WebSocket.

Owns: the asyncio Protocol, the websockets Sans-I/O frame state machine, write batching,
flow control in both directions, what happens when one of its timers (held by its
`ConnTimers`, transport/timers.py) expires: header-read deadline, heartbeat, per-message
read deadline, write timeout, and the bounded close handshake; and, for a live handover, its
exact state (unsent bytes, a half-read frame, a partial message) out and back in. This is
the transport boundary: endpoints see only `Connection`'s small public surface (send_text,
close, ping, pause/resume reading, write_paused) and the `WsHandler` callbacks.
Must never: parse envelopes, touch the registry, or log. No task is created per
connection or per message: everything runs in protocol callbacks and loop timers.

Why one file past 450 lines: `Connection` is one state machine on the per-frame path, and
its parsing, batching and flow control share the same few fields on every read and write;
split across objects, each frame would pay extra attribute hops (ADR 0010 measured what a
few microseconds per frame cost). What is not on that path lives elsewhere: the request head
and the handshake (http.py), the timers (timers.py). The live handover's export, adoption and
resumption (the "live handover" section) stay here although they are not on that path: they
read and set exactly those private fields, which would otherwise have to become public.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as TypingProtocol

from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import OPEN, Side
from websockets.protocol import Protocol as WsProtocol

from pyrycode_relay.core.addresses import ListenAddress
from pyrycode_relay.core.config import Config
from pyrycode_relay.core.envelope import is_utf8
from pyrycode_relay.core.handover_state import HandoverError, WsState
from pyrycode_relay.transport.http import (
    WS_LOGGER,
    HeadReader,
    HttpError,
    RequestHead,
    error_response,
)
from pyrycode_relay.transport.timers import ConnTimers

_TEXT, _BINARY, _CONT, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG

# Bytes handed to the frame parser per loop iteration. One socket read (up to 256 KiB)
# of tiny frames takes the parser ~90 ms; in 16 KiB slices a flooder holds the loop for a
# few ms at a time and every other peer is served in between (ADR 0009).
_PARSE_SLICE = 16 * 1024

# Most bytes a phone's writer hands over for one write(2) (see Connection._flush).
BATCH_BYTES = 64 * 1024


def read_limit_reason(max_message_bytes: int) -> str:
    """The 1009 close reason, as the reference's library (coder/websocket) writes it: that
    library reads one byte past the limit to see whether a message ends there, and names
    that read size, so a 262 144-byte cap reads `read limited at 262145 bytes`."""
    return f"read limited at {max_message_bytes + 1} bytes"


class _WsProtocol(WsProtocol):
    """websockets' Sans-I/O protocol whose over-size close (1009, raised by its parser when
    a message outgrows `max_size`) carries the reference's reason instead of websockets'
    own text; every other failure keeps websockets' reason."""

    def __init__(self, max_size: int) -> None:
        super().__init__(Side.SERVER, state=OPEN, max_size=max_size, logger=WS_LOGGER)
        self._too_big_reason = read_limit_reason(max_size)

    def fail(self, code: CloseCode | int, reason: str = "") -> None:
        if code == CloseCode.MESSAGE_TOO_BIG:
            reason = self._too_big_reason
        super().fail(code, reason)


@dataclass(frozen=True, slots=True)
class ConnSettings:
    """Per-connection limits and timers, all from the config (seconds / bytes); one per
    listener."""

    handshake_timeout: float
    heartbeat_interval: float
    heartbeat_timeout: float
    message_read_timeout: float
    write_timeout: float
    max_message_bytes: int
    # The least send-buffer high-water mark a connection gets. asyncio's TLS transport
    # pauses writing at (a socket transport: above) the mark, so a phone's 0 ("any unsent
    # byte counts as blocked") would pause it with an empty buffer, never to resume: TLS
    # listeners set 1, which means the same there. (That transport counts only bytes not
    # yet handed to the TCP transport below it: behind TLS a stalled phone is noticed
    # about 64 KiB later; the outbox bounds hold.)
    write_high_floor: int = 0

    @classmethod
    def from_config(cls, config: Config) -> ConnSettings:
        return cls(
            handshake_timeout=config.handshake_timeout,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
            message_read_timeout=config.message_read_timeout,
            write_timeout=config.write_timeout,
            max_message_bytes=config.max_message_bytes,
        )

    @property
    def close_timeout(self) -> float:
        # How long we wait for the peer's close frame before dropping TCP; coder/websocket
        # waits about 5 s, a short --write-timeout (tests) shortens it too.
        return min(5.0, self.write_timeout)

    @property
    def backlog_limit(self) -> int:
        # Unsent bytes to one peer above which we stop reading from it (ADR 0009). A
        # peer that sends pings but never reads would otherwise grow our send buffer with
        # pongs for the whole --write-timeout. Twice the message cap (at least 1 MiB)
        # leaves room for one whole outbound message plus control frames, so honest
        # traffic stays below it.
        return max(1 << 20, 2 * self.max_message_bytes)


class WsHandler(TypingProtocol):
    """What an endpoint session implements to receive WebSocket events."""

    def on_message(self, data: bytes) -> None: ...
    def on_writable(self) -> None: ...
    def on_write_timeout(self) -> None: ...
    def on_heartbeat_timeout(self) -> None: ...
    def on_closed(self) -> None: ...
    def shutdown(self) -> None: ...


class Listener(TypingProtocol):
    """What the drain needs from a listener (asyncio.Server, the PROXY v2 front's)."""

    def close(self) -> None: ...


class Router(TypingProtocol):
    """Decides what to do with a complete request head: must call `respond()` or
    `accept_websocket()` on the connection before returning."""

    def route(self, conn: Connection, head: RequestHead) -> None: ...


async def listen(
    address: ListenAddress, router: Router, settings: ConnSettings, live: set[Connection]
) -> asyncio.Server:
    """A plain TCP listener whose every connection is a `Connection` on `router`."""
    loop = asyncio.get_running_loop()

    def factory() -> Connection:
        return Connection(router, settings, live)

    return await loop.create_server(factory, address.host or None, address.port, backlog=4096)


class ServerGroup:
    """Several listeners closed as one (the sockets of one address a predecessor handed
    over: an address like ":8080" has one per address family)."""

    def __init__(self, servers: list[asyncio.Server]) -> None:
        self.servers = servers

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self.servers for sock in server.sockets]

    def close(self) -> None:
        for server in self.servers:
            server.close()


async def adopt_listener(
    socks: list[socket.socket],
    router: Router,
    settings: ConnSettings,
    live: set[Connection],
    **kwargs: Any,
) -> ServerGroup:
    """`listen` over the listening sockets a predecessor handed over (live handover);
    `kwargs` go to `create_server` (a TLS listener's `ssl`)."""
    loop = asyncio.get_running_loop()

    def factory() -> Connection:
        return Connection(router, settings, live)

    return ServerGroup(
        [await loop.create_server(factory, sock=s, backlog=4096, **kwargs) for s in socks]
    )


def _wire_size(payload_length: int) -> int:
    """Bytes a client frame with this payload occupies on the wire: 2 header bytes, the
    extended length (RFC 6455 requires the minimal encoding), and the 4-byte mask every
    client frame carries (websockets refuses unmasked ones)."""
    if payload_length < 126:
        return 6 + payload_length
    if payload_length < 65536:
        return 8 + payload_length
    return 14 + payload_length


class Connection(asyncio.Protocol):
    """One accepted TCP connection, from its request head to its close.

    Concurrency: asyncio calls the Protocol methods on the loop's thread, one at a time;
    everything else here runs from them, from this connection's timers and `call_soon`
    callbacks, or from a session (which, in cluster mode, may be acting on a placement task's
    decision); nothing here awaits. The handler (a session) is called from those callbacks
    and may call back in (send, close, pause). Who closes what: the relay
    closes through `close` (a close frame, then the transport after the close timeout) or
    `abort`; the transport reports the end once, through `connection_lost`, which stops
    every timer and runs the handler's `on_closed` (at most once, also when the relay
    closed first).
    """

    __slots__ = (
        "_adopting",
        "_backlog_paused",
        "_cork",
        "_cork_bytes",
        "_eof_pending",
        "_fragments",
        "_fragments_text",
        "_head",
        "_head_raw",
        "_live",
        "_loop",
        "_ping_seq",
        "_pings",
        "_reading_paused",
        "_router",
        "_rx_partial",
        "_rx_tail",
        "_settings",
        "_timers",
        "_transport_paused",
        "_unparsed",
        "_unsent",
        "_unsent_bytes",
        "_write_high",
        "accepted_at",
        "cap_key",
        "closing",
        "handler",
        "on_release",
        "opened_at",
        "peer_host",
        "timed_out_reading",
        "transport",
        "write_paused",
        "ws",
    )

    def __init__(
        self,
        router: Router,
        settings: ConnSettings,
        live: set[Connection],
        peer_host: str = "",
        *,
        handed: bool = False,
    ) -> None:
        self._router = router
        self._settings = settings
        self._live = live
        self._loop = asyncio.get_running_loop()
        # (A handed-over connection gets its head reader, if it needs one, from adopt_head.)
        self._head: HeadReader | None = None if handed else HeadReader()
        self._head_raw = b""  # the request head's bytes so far (a handover carries them)
        self._timers = ConnTimers(self._loop, settings, self)
        self._pings: dict[bytes, Callable[[], None]] | None = None
        self._ping_seq = 0
        # One buffer per fragmented message: its memory is the payload itself, however
        # many (even empty) fragments it came in (a list of bytes cost ~60x for 1-byte
        # fragments).
        self._fragments: bytearray | None = None
        self._fragments_text = False
        self._reading_paused = False  # by an endpoint (back-pressure toward a binary)
        self._backlog_paused = False  # by us: too many unsent bytes to this peer
        self._unparsed: bytes | None = None  # the rest of a large read, parsed in slices
        self._transport_paused = False  # what we last told the transport
        self._rx_partial = 0  # bytes received that no complete frame has accounted for
        # The reads those `_rx_partial` bytes came in (None when there are none): a handover
        # replays them into the successor's parser.
        self._rx_tail: list[bytes] | None = None
        # The writes whose bytes the transport may still hold (None when its buffer was
        # seen empty): a handover sends what is left of them from the successor.
        self._unsent: list[bytes] | None = None
        self._unsent_bytes = 0  # their total
        # Outbound frames held until the end of this loop iteration (see _flush).
        self._cork: list[bytes] = []
        self._cork_bytes = 0
        self._write_high = 0
        self.transport: asyncio.Transport | None = None
        self.ws: WsProtocol | None = None
        self.handler: WsHandler | None = None
        self.peer_host = peer_host  # the client's address: a PROXY header's source, if given
        self.closing = False
        self.write_paused = False
        self.timed_out_reading = False
        self.on_release: Callable[[], None] | None = None  # returns an admission slot
        # Loop times (monotonic seconds) of the accepted connection (behind TLS: its
        # handshake done) and of the 101 written; read by the endpoints once at the start
        # and once at the end of the WebSocket, never per frame.
        self.accepted_at = 0.0
        self.opened_at = 0.0
        self.cap_key: str | None = None  # the key of that slot (a handover re-takes it)
        self._adopting = False  # handed over: nothing parsed until `resume_ws`/`resume_head`
        self._eof_pending = False  # (adopting) the peer's end came before the replay

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.accepted_at = self._loop.time()
        if not self.peer_host:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:
                self.peer_host = str(peer[0])
        self._live.add(self)
        if self._adopting:
            # A socket handed over by a predecessor: nothing is parsed before what the
            # predecessor had read is replayed (`resume_ws`, `resume_head`); what arrives
            # meanwhile is kept (uvloop starts reading right after this, paused or not).
            self._transport_paused = True
            transport.pause_reading()
            if self.ws is not None:
                transport.set_write_buffer_limits(high=self._write_high, low=0)
            return
        self._timers.start_head()

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self._ws_data(data)
            return
        head_reader = self._head
        if head_reader is None:
            return  # response sent; the rest is ignored until the close completes
        self._head_raw += data  # bounded: the head reader refuses a head over its limit
        if self._adopting:
            return  # parsed by `resume_head`, after what the predecessor had read
        try:
            head = head_reader.feed(data)
        except HttpError as exc:
            self.respond(error_response(exc.status))
            return
        if head is None:
            return
        self._timers.stop_head()
        self._router.route(self, head)

    def eof_received(self) -> bool | None:
        ws = self.ws
        if self._adopting and ws is not None:
            # The peer's end, before the predecessor's bytes are replayed: after them.
            self._eof_pending = True
            return True  # keep the transport: `resume_ws` finishes this
        if ws is not None:
            ws.receive_eof()
            self._flush()
        return None  # let the transport close

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.handler is not None:
            self._timers.start_write()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._unsent = None  # the buffer is empty (the low-water mark is 0)
        self._timers.stop_write()
        if self._backlog_paused:
            self._backlog_paused = False
            self._apply_reading()
        handler = self.handler
        if handler is not None and not self.closing:
            handler.on_writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        self._timers.stop_all()
        self._pings = None
        self._unparsed = None  # a slice still scheduled for parsing is moot now
        self.closing = True
        self._finish()
        release, self.on_release = self.on_release, None
        if release is not None:
            release()

    # -- HTTP phase -----------------------------------------------------------------

    def respond(self, raw: bytes) -> None:
        """Send a complete non-101 response and close the connection."""
        self._head = None
        self._head_raw = b""
        self._timers.stop_head()
        transport = self.transport
        if transport is not None:
            transport.write(raw)
            transport.close()

    def accept_websocket(
        self,
        handshake: bytes,
        handler: WsHandler,
        write_high: int,
        start: Callable[[], None],
    ) -> None:
        """Send the 101, switch to WebSocket frames and run `start` (the registry step)
        before any early frame is read. `write_high` is the send-buffer size above which
        writing counts as blocked (0: any unsent byte counts)."""
        head_reader, self._head = self._head, None
        self._head_raw = b""
        transport = self.transport
        assert transport is not None and head_reader is not None
        self.ws = self._new_ws()
        self.handler = handler
        write_high = max(write_high, self._settings.write_high_floor)
        self._write_high = write_high
        transport.set_write_buffer_limits(high=write_high, low=0)
        transport.write(handshake)
        self.opened_at = self._loop.time()
        start()
        early = head_reader.trailing()
        if early:
            self._ws_data(early)

    def _new_ws(self) -> WsProtocol:
        return _WsProtocol(self._settings.max_message_bytes)

    # -- WebSocket phase: inbound -------------------------------------------------

    def _ws_data(self, data: bytes) -> None:
        if self._unparsed is not None:  # (reading is paused meanwhile; defensive)
            self._unparsed += data
            return
        if self._reading_paused:
            # Held by the endpoint (e.g. a cluster admission still in flight): frames
            # already read wait, unparsed, until `resume_reading`.
            self._unparsed = data
            self._apply_reading()
            return
        if len(data) > _PARSE_SLICE:
            self._unparsed = data[_PARSE_SLICE:]
            data = data[:_PARSE_SLICE]
            self._apply_reading()
            self._loop.call_soon(self._parse_more)
        self._parse(data)

    def _parse_more(self) -> None:
        if self._reading_paused or self._adopting:
            # Held (`resume_reading` schedules us again), or adopting: nothing is parsed
            # before the predecessor's bytes are replayed (`resume_ws` parses all of it).
            return
        rest, self._unparsed = self._unparsed, None
        if rest is None:
            return  # the connection was lost meanwhile (connection_lost drops the rest)
        # Parsing goes on after a relay-initiated close: the peer's close reply may be in
        # this very read, and finishing the handshake early frees the connection early.
        if len(rest) > _PARSE_SLICE:
            self._unparsed = rest[_PARSE_SLICE:]
            rest = rest[:_PARSE_SLICE]
            self._loop.call_soon(self._parse_more)
        else:
            self._apply_reading()
        self._parse(rest)

    def _parse(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        ws.receive_data(data)
        partial = self._rx_partial + len(data)
        for frame in ws.events_received():
            assert isinstance(frame, Frame)  # after the handshake only frames arrive
            partial -= _wire_size(len(frame.data))
            opcode = frame.opcode
            if opcode is _PONG:
                self._on_pong(bytes(frame.data))
                continue
            if self.closing or (
                opcode is not _TEXT and opcode is not _BINARY and opcode is not _CONT
            ):
                continue  # ping is answered by websockets; close is handled below
            if frame.fin and self._fragments is None:
                message = bytes(frame.data)
                text = opcode is _TEXT
            else:
                if self._fragments is None:
                    self._fragments = bytearray()
                    self._fragments_text = opcode is _TEXT
                self._fragments += frame.data
                if not frame.fin:
                    continue
                message = bytes(self._fragments)
                text = self._fragments_text
                self._fragments = None
            if text and not is_utf8(message):
                self.close(1007, "invalid UTF-8")
                continue
            handler = self.handler
            if handler is not None:
                handler.on_message(message)
        if partial:
            # Keep the raw bytes of the half-received frame (its head may already be in the
            # parser): only reads that end mid-frame pay for this.
            tail = self._rx_tail
            if tail is None or partial <= len(data):
                self._rx_tail = [data if partial == len(data) else data[-partial:]]
            else:
                tail.append(data)
        elif self._rx_tail is not None:
            self._rx_tail = None
        self._rx_partial = partial
        self._flush()
        if not self.closing:
            self._track_message_deadline()
        self._bound_backlog()

    def _bound_backlog(self) -> None:
        # What we read can make us write (websockets answers every ping, also while
        # closing). Stop reading while this peer's unsent bytes exceed the limit; its
        # drain (resume_writing) resumes reading, the write timeout ends a peer that
        # never drains. So a never-reading ping flooder costs at most the limit plus one
        # socket read of pongs.
        transport = self.transport
        if (
            not self._backlog_paused
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() > self._settings.backlog_limit
        ):
            self._backlog_paused = True
            self._apply_reading()

    def _track_message_deadline(self) -> None:
        # A message is in progress while a frame is half-read (bytes arrived that no
        # complete frame accounts for — the parser may already hold its header) or a
        # fragmented message is open; it must then complete within
        # --message-read-timeout of its first byte. Idle time between messages is never
        # limited (that is the heartbeat's job).
        # While the endpoint holds this peer (back-pressure toward a congested binary, a
        # cluster admission) nothing is read, so nothing is late: the deadline restarts
        # when reading does, like the reference's per-read deadline.
        in_progress = self._fragments is not None or self._rx_partial > 0
        self._timers.track_message(in_progress and not self._reading_paused)

    def message_timed_out(self) -> None:
        self.timed_out_reading = True
        self.close(1008, "message read timeout")

    # -- WebSocket phase: outbound ------------------------------------------------

    def send_text(self, data: bytes) -> bool:
        """Queue one text frame on the socket; False once the connection is closing."""
        ws = self.ws
        if ws is None or self.closing:
            return False
        ws.send_text(data)
        self._flush()
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake; the TCP connection is dropped if the peer does not
        answer within the close timeout. Idempotent."""
        ws = self.ws
        if ws is None:
            if self.transport is not None:
                self.transport.abort()
            return
        if self.closing:
            return
        self.closing = True
        self._stop_timers()
        if ws.state is OPEN:
            ws.send_close(code, reason)
            self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self._timers.start_close()
        self._finish()

    def _finish(self) -> None:
        """The WebSocket is over for the endpoint: its "read loop" ends now, as the
        reference's does when the relay closes a connection, even though the close
        handshake (and the admission slot) may last up to the close timeout longer.
        Without this, a peer that never answers a close would delay its close notice
        and unregistration by the whole timeout. Runs the handler's teardown once."""
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.on_closed()

    def abort(self) -> None:
        self.closing = True
        self._stop_timers()  # connection_lost follows, and stops the close timer too
        self._uncork()  # what an unbatched write would already have handed to the kernel
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        ws = self.ws
        transport = self.transport
        assert ws is not None and transport is not None
        for chunk in ws.data_to_send():
            if chunk:
                # Write batching (ADR 0010): frames are joined into one write(2) at the end
                # of this loop iteration instead of one syscall per frame.
                cork = self._cork
                if not cork:
                    self._loop.call_soon(self._uncork_soon)
                cork.append(chunk)
                self._cork_bytes += len(chunk)
                # A peer with a send-buffer allowance (a binary) is written at once when
                # the batch would reach its high-water mark: the immediate write could not
                # have paused the transport before that, so `write_paused` changes at
                # exactly the same sends as without batching. A peer without one (a
                # phone: any unsent byte counts as blocked) is never written mid-batch;
                # its writer stops adding at BATCH_BYTES (`batch_full`) and keeps what it
                # handed over counted until `on_writable` says the batch is written.
                if (
                    self._write_high > 1
                    and self._cork_bytes + transport.get_write_buffer_size() >= self._write_high
                ):
                    self._uncork()
            else:  # websockets signals "close the TCP connection" with an empty chunk
                self._uncork()
                self.closing = True
                self._stop_timers()
                transport.close()
                self._timers.start_close()
                self._finish()

    @property
    def batch_full(self) -> bool:
        """The batch to be written at the end of this loop iteration is big enough."""
        return self._cork_bytes >= BATCH_BYTES

    def _uncork_soon(self) -> None:
        self._uncork()
        # For a peer without a send-buffer allowance, a batch the kernel took whole is
        # its "write finished": tell the endpoint, which releases what it counted as
        # being written. (A partial write paused the transport; resume_writing tells it.)
        handler = self.handler
        if (
            self._write_high <= 1
            and handler is not None
            and not self.closing
            and not self.write_paused
        ):
            handler.on_writable()

    def _uncork(self) -> None:
        cork = self._cork
        if not cork:
            return
        self._cork = []
        self._cork_bytes = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            data = cork[0] if len(cork) == 1 else b"".join(cork)
            # The unsent journal (for a handover): the transport's buffer is always a suffix
            # of the writes since it was last seen empty. A phone's buffer is empty exactly
            # while it is not paused (its high-water mark is 0); a binary's is asked.
            unsent = self._unsent
            if (
                unsent is not None
                and not self.write_paused
                and not transport.get_write_buffer_size()
            ):
                unsent = self._unsent = None
            transport.write(data)
            if unsent is not None:
                unsent.append(data)
                kept = self._unsent_bytes + len(data)
                # Writes older than what the transport still holds went to the kernel:
                # dropped, so a peer always a little behind (a binary whose buffer is never
                # quite empty) keeps a journal the size of its buffer, not of its history.
                buffered = transport.get_write_buffer_size()
                while len(unsent) > 1 and kept - len(unsent[0]) >= buffered:
                    kept -= len(unsent.pop(0))
                self._unsent_bytes = kept
            elif self.write_paused or (self._write_high > 1 and transport.get_write_buffer_size()):
                self._unsent = [data]
                self._unsent_bytes = len(data)

    def _stop_timers(self) -> None:
        self._timers.stop_open()
        self._pings = None

    # -- timer expiries (ConnTimers calls these) --------------------------------------

    def head_timed_out(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_timed_out(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def write_timed_out(self) -> None:
        handler = self.handler
        if handler is not None and not self.closing:
            handler.on_write_timeout()
        else:
            self.abort()

    # -- flow control toward the peer we read from ----------------------------------

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closing:
            self._reading_paused = True
            self._track_message_deadline()
            self._apply_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self.closing:
                self._track_message_deadline()
            if self._unparsed is not None:
                self._loop.call_soon(self._parse_more)  # what arrived while held
            else:
                self._apply_reading()

    def _apply_reading(self) -> None:
        # The socket is read only while no reason to pause holds: an endpoint's
        # back-pressure, our unsent backlog to this peer, or a read still being parsed.
        transport = self.transport
        if transport is None or transport.is_closing() or self._adopting:
            return  # (adopting: stays paused until `resume_ws`/`resume_head`)
        paused = self._reading_paused or self._backlog_paused or self._unparsed is not None
        if paused and not self._transport_paused:
            self._transport_paused = True
            transport.pause_reading()
        elif not paused and self._transport_paused:
            self._transport_paused = False
            transport.resume_reading()

    # -- pings: heartbeat and conflict probe ----------------------------------------

    def ping(self, on_pong: Callable[[], None]) -> bool:
        """Send a ping; `on_pong` runs when its pong (or a later one) arrives."""
        ws = self.ws
        if ws is None or self.closing:
            return False
        self._ping_seq += 1
        payload = str(self._ping_seq).encode()  # a decimal counter, like coder/websocket
        if self._pings is None:
            self._pings = {}
        self._pings[payload] = on_pong
        ws.send_ping(payload)
        self._flush()
        return True

    def _on_pong(self, payload: bytes) -> None:
        pings = self._pings
        if not pings or payload not in pings:
            return
        # A peer may answer only the latest of several pings (RFC 6455 §5.5.3), so a pong
        # also answers every ping sent before it.
        answered = []
        for key in list(pings):
            answered.append(pings.pop(key))
            if key == payload:
                break
        for callback in answered:
            callback()

    def start_heartbeat(self) -> None:
        """Ping every interval on a fixed ticker; no pong within the timeout →
        `handler.on_heartbeat_timeout()`."""
        self._timers.start_heartbeat()

    def heartbeat_missed(self) -> None:
        handler = self.handler
        if handler is not None and not self.closing:
            handler.on_heartbeat_timeout()

    # -- live handover ----------------------------------------------------------------

    @property
    def router(self) -> Router:
        return self._router

    @property
    def handable(self) -> bool:
        """Open, and either still reading its request head or a WebSocket: a handover can
        carry it. (A connection being closed, or whose head waits for an admission
        decision, is not carried; it ends with this process.)"""
        transport = self.transport
        if transport is None or transport.is_closing() or self.closing:
            return False
        if self.ws is not None:
            return self.handler is not None
        return self._head is not None and self.on_release is None

    def export_head(self) -> bytes:
        """The request head's bytes received so far."""
        return self._head_raw

    def export_ws(self) -> WsState:
        """This WebSocket's transport state, exactly: what the kernel still lacks of our
        writes, what the parser holds of a half-read frame, what was read and not parsed.
        Called with the event loop held (nothing is read or written meanwhile)."""
        ws, transport = self.ws, self.transport
        assert ws is not None and transport is not None
        size = transport.get_write_buffer_size()
        unsent = b""
        if size:
            journal = b"".join(self._unsent or ())
            if len(journal) < size:
                raise HandoverError("a connection's unsent bytes are not known")
            unsent = journal[len(journal) - size :]
        if self._cork:
            unsent += b"".join(self._cork)
        rx_tail = b""
        partial = self._rx_partial
        if partial:
            tail = b"".join(self._rx_tail or ())
            if len(tail) < partial:
                raise HandoverError("a connection's half-read frame is not known")
            rx_tail = tail[len(tail) - partial :]
        fragments = self._fragments
        pings = self._pings or {}
        ponged = self._timers.heartbeat_callback
        return WsState(
            write_high=self._write_high,
            unsent=unsent,
            rx_tail=rx_tail,
            unparsed=self._unparsed or b"",
            fragments=None if fragments is None else bytes(fragments),
            fragments_text=self._fragments_text,
            reading_paused=self._reading_paused,
            ping_seq=self._ping_seq,
            heartbeat_pings=[p for p, cb in pings.items() if cb == ponged],
            timers=self._timers.export(),
            age=self._loop.time() - self.opened_at,
        )

    def adopt_head(self, raw: bytes) -> None:
        """A handed-over connection still reading its request head (`raw` so far); adopt
        the socket next."""
        self._adopting = True
        self._head = HeadReader()
        self._head_raw = raw

    def adopt_ws(self, state: WsState, handler: WsHandler) -> None:
        """A handed-over WebSocket (before its socket is adopted): open, with `handler`."""
        self._adopting = True
        self._head = None
        self.ws = self._new_ws()
        self.handler = handler
        self.opened_at = self.accepted_at = self._loop.time() - state.age
        self._write_high = max(state.write_high, self._settings.write_high_floor)
        self._ping_seq = state.ping_seq
        self._reading_paused = state.reading_paused
        self._unparsed = b""  # collects what arrives before `resume_ws` (see _ws_data)
        if state.unsent:
            # First in line: whatever this connection writes before `resume_ws` (a close
            # notice to a binary, from a phone that left meanwhile) queues behind it.
            self._cork.append(state.unsent)
            self._cork_bytes += len(state.unsent)

    def resume_head(self) -> None:
        """Serve an adopted connection that was reading its request head."""
        self._adopting = False
        raw, self._head_raw = self._head_raw, b""
        self._timers.start_head()
        self._apply_reading()
        if raw:
            self.data_received(raw)

    def resume_ws(self, state: WsState, lag: float) -> None:
        """Serve an adopted WebSocket (every connection of the handover is adopted by now,
        so what a replayed message triggers reaches its peer): our unsent bytes go first,
        then the inbound bytes the predecessor held are parsed, then the socket is read.
        Timers resume with what was left of them, less `lag` (the handover's duration)."""
        self._adopting = False
        self._uncork()  # the predecessor's unsent bytes; may pause writing (write timer)
        self._timers.restore(state.timers, lag)
        if state.heartbeat_pings:
            ponged = self._timers.heartbeat_callback
            self._pings = dict.fromkeys(state.heartbeat_pings, ponged)
        replay = b""
        if state.fragments is not None:
            # The message's earlier frames, replayed as one frame so that the new parser
            # expects the continuation (and counts the size) exactly as the old one did.
            opcode = _TEXT if state.fragments_text else _BINARY
            replay = Frame(opcode, state.fragments, fin=False).serialize(mask=True)
        early, self._unparsed = self._unparsed or b"", None
        replay += state.rx_tail + state.unparsed + early
        if replay:
            self._ws_data(replay)
        self._timers.restore_message(state.timers, lag)
        if self._eof_pending:
            self._eof_pending = False
            self.eof_received()
            if self.transport is not None:
                self.transport.close()
            return
        self._apply_reading()
        if not self.write_paused:
            self._loop.call_soon(self._writable)

    def _writable(self) -> None:
        # After a handover: whatever the endpoint was waiting for (its outbox's batch to
        # be written, its binary's socket to drain) happened, or will via resume_writing.
        handler = self.handler
        if handler is not None and not self.closing and not self.write_paused:
            handler.on_writable()

    # -- close information for the endpoint's teardown ----------------------------

    @property
    def peer_close_code(self) -> int | None:
        """The code of the peer's close frame if the peer closed first (1005 when its
        close frame had no status), else None."""
        ws = self.ws
        if ws is None or ws.close_rcvd is None or ws.close_rcvd_then_sent is False:
            return None
        return int(ws.close_rcvd.code)

    @property
    def end_state(self) -> tuple[int, str]:
        """How the WebSocket ended, for the endpoint's teardown: (close code, who closed
        first: `peer`, `relay`, or `none` with 1006 when the TCP connection ended without
        a close frame either way: the peer vanished, or the relay dropped a peer that
        stopped reading)."""
        code = self.peer_close_code
        if code is not None:
            return code, "peer"
        code = self.relay_close_code
        if code is not None:
            return code, "relay"
        return 1006, "none"

    @property
    def relay_close_code(self) -> int | None:
        """The code the relay sent if it closed first (including library closes such as
        1009 for an over-size message), else None."""
        ws = self.ws
        if ws is None or ws.close_sent is None or ws.close_rcvd_then_sent:
            return None
        return int(ws.close_sent.code)
