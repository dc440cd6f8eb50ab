"""Every timer of one connection, and the liveness probe.

Owns: `ConnTimers` — one connection's timers by name, started and cancelled only here:
the request-head deadline, the write timeout (time spent with the send buffer full), the
per-message read deadline, the close-handshake timeout, and the heartbeat (a fixed ticker
that pings, and the deadline for its pong); and `probe` — ping a peer and decide, within a
timeout, whether it is alive (the conflict probe of an incumbent binary, on its own instance
or for a claimant on another).
Must never: do I/O (it calls its owner back), or leave a timer running once its owner has
stopped it: every expiry first forgets its handle, then calls back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pyrycode_relay.core.handover_state import TimerState


class Handle(Protocol):
    def cancel(self) -> None: ...
    def when(self) -> float: ...


class Scheduler(Protocol):
    """What the timers need of an event loop (a fake one in tests)."""

    def time(self) -> float: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> Handle: ...
    def call_at(self, when: float, callback: Callable[[], None]) -> Handle: ...


class Pingable(Protocol):
    def ping(self, on_pong: Callable[[], None]) -> bool:
        """Send a ping; `on_pong` runs when its pong arrives. False if none can be sent."""
        ...


class TimerOwner(Pingable, Protocol):
    """What a connection does when one of its timers expires."""

    def head_timed_out(self) -> None: ...
    def write_timed_out(self) -> None: ...
    def message_timed_out(self) -> None: ...
    def close_timed_out(self) -> None: ...
    def heartbeat_missed(self) -> None: ...


class TimerSettings(Protocol):
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def write_timeout(self) -> float: ...
    @property
    def message_read_timeout(self) -> float: ...
    @property
    def close_timeout(self) -> float: ...
    @property
    def heartbeat_interval(self) -> float: ...
    @property
    def heartbeat_timeout(self) -> float: ...


class ConnTimers:
    """The timers of one connection.

    Concurrency: the event loop's thread only. Expiries are loop callbacks; each forgets its
    handle before it calls the owner, so the owner may start or stop any timer from there.
    """

    __slots__ = (
        "_loop",
        "_next_tick",
        "_owner",
        "_settings",
        "close",
        "head",
        "message",
        "pong",
        "tick",
        "write",
    )

    def __init__(self, loop: Scheduler, settings: TimerSettings, owner: TimerOwner) -> None:
        self._loop = loop
        self._settings = settings
        self._owner = owner
        self.head: Handle | None = None
        self.write: Handle | None = None
        self.message: Handle | None = None
        self.close: Handle | None = None
        self.tick: Handle | None = None
        self.pong: Handle | None = None
        self._next_tick = 0.0

    # -- the request head ---------------------------------------------------------

    def start_head(self) -> None:
        self.head = self._loop.call_later(self._settings.handshake_timeout, self._head_expired)

    def stop_head(self) -> None:
        if self.head is not None:
            self.head.cancel()
            self.head = None

    def _head_expired(self) -> None:
        self.head = None
        self._owner.head_timed_out()

    # -- writing ------------------------------------------------------------------

    def start_write(self) -> None:
        """The send buffer filled up: it must drain within --write-timeout."""
        if self.write is None:
            self.write = self._loop.call_later(self._settings.write_timeout, self._write_expired)

    def stop_write(self) -> None:
        if self.write is not None:
            self.write.cancel()
            self.write = None

    def _write_expired(self) -> None:
        self.write = None
        self._owner.write_timed_out()

    # -- reading a message ----------------------------------------------------------

    def track_message(self, in_progress: bool) -> None:
        """A message in progress must complete within --message-read-timeout of the moment
        this first said so; none in progress, no deadline."""
        if in_progress:
            if self.message is None:
                self.message = self._loop.call_later(
                    self._settings.message_read_timeout, self._message_expired
                )
        elif self.message is not None:
            self.message.cancel()
            self.message = None

    def _message_expired(self) -> None:
        self.message = None
        self._owner.message_timed_out()

    # -- the close handshake ------------------------------------------------------

    def start_close(self) -> None:
        """The close handshake began: the peer has the close timeout to finish it."""
        if self.close is None:
            self.close = self._loop.call_later(self._settings.close_timeout, self._close_expired)

    def _close_expired(self) -> None:
        self.close = None
        self._owner.close_timed_out()

    # -- heartbeat ----------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Ping every --heartbeat-interval on a fixed ticker; no pong within
        --heartbeat-timeout → `owner.heartbeat_missed()`."""
        self._next_tick = self._loop.time() + self._settings.heartbeat_interval
        self.tick = self._loop.call_at(self._next_tick, self._ticked)

    def _ticked(self) -> None:
        self._next_tick += self._settings.heartbeat_interval
        self.tick = self._loop.call_at(self._next_tick, self._ticked)
        if self.pong is not None:
            return  # the outstanding ping's own deadline decides
        self.pong = self._loop.call_later(self._settings.heartbeat_timeout, self._pong_missed)
        if not self._owner.ping(self._ponged):
            self.pong.cancel()
            self.pong = None

    def _ponged(self) -> None:
        if self.pong is not None:
            self.pong.cancel()
            self.pong = None

    def _pong_missed(self) -> None:
        self.pong = None
        self._owner.heartbeat_missed()

    # -- live handover --------------------------------------------------------------

    @property
    def heartbeat_callback(self) -> Callable[[], None]:
        """What a heartbeat ping's pong runs (a handover tells it from a probe's)."""
        return self._ponged

    def export(self) -> TimerState:
        """Seconds left on each running timer a handover carries (the head and close
        timers belong to connections a handover does not carry)."""
        now = self._loop.time()

        def left(handle: Handle | None) -> float | None:
            return None if handle is None else max(0.0, handle.when() - now)

        return TimerState(
            tick=None if self.tick is None else max(0.0, self._next_tick - now),
            pong=left(self.pong),
            message=left(self.message),
            write=left(self.write),
        )

    def restore(self, state: TimerState, lag: float) -> None:
        """Resume the heartbeat and the write timeout with what was left of them, less
        `lag` (the handover's duration, during which their time ran on)."""
        now = self._loop.time()
        if state.tick is not None:
            self._next_tick = now + max(0.0, state.tick - lag)
            self.tick = self._loop.call_at(self._next_tick, self._ticked)
        if state.pong is not None:
            self.pong = self._loop.call_later(max(0.0, state.pong - lag), self._pong_missed)
        if state.write is not None and self.write is not None:
            self.write.cancel()
            self.write = self._loop.call_later(max(0.0, state.write - lag), self._write_expired)

    def restore_message(self, state: TimerState, lag: float) -> None:
        """The message deadline of a message in progress keeps its predecessor's start."""
        if state.message is not None and self.message is not None:
            self.message.cancel()
            self.message = self._loop.call_later(
                max(0.0, state.message - lag), self._message_expired
            )

    # -- stopping -------------------------------------------------------------------

    def stop_open(self) -> None:
        """The connection is closing: every timer but the close handshake's stops."""
        for handle in (self.head, self.write, self.message, self.tick, self.pong):
            if handle is not None:
                handle.cancel()
        self.head = self.write = self.message = self.tick = self.pong = None

    def stop_all(self) -> None:
        """The connection is gone."""
        self.stop_open()
        if self.close is not None:
            self.close.cancel()
            self.close = None


def probe(
    peer: Pingable,
    loop: Scheduler,
    timeout: float,
    alive: Callable[[], None],
    silent: Callable[[], None],
) -> None:
    """Ping `peer`: `alive` runs if its pong arrives within `timeout`, else `silent` (also at
    once when no ping can be sent). Exactly one of the two runs, once."""
    decided = False

    def answered() -> None:
        nonlocal decided
        if not decided:
            decided = True
            timer.cancel()
            alive()

    def expired() -> None:
        nonlocal decided
        if not decided:
            decided = True
            silent()

    timer = loop.call_later(timeout, expired)
    if not peer.ping(answered):
        timer.cancel()
        expired()
