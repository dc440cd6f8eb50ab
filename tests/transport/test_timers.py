"""transport.timers in-process: a connection's timers and the liveness probe on a fake loop
whose time moves only when the test says so."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from pyrycode_relay.transport.timers import ConnTimers, probe


@dataclass(order=True)
class FakeHandle:
    at: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True

    def when(self) -> float:
        return self.at


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self._queue: list[FakeHandle] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(when, next(self._seq), callback)
        heapq.heappush(self._queue, handle)
        return handle

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        return self.call_at(self.now + delay, callback)

    def advance(self, seconds: float) -> None:
        """Run every callback due by now + seconds, in time order."""
        end = self.now + seconds
        while self._queue and self._queue[0].at <= end:
            handle = heapq.heappop(self._queue)
            self.now = handle.at
            if not handle.cancelled:
                handle.callback()
        self.now = end

    @property
    def pending(self) -> int:
        return sum(not h.cancelled for h in self._queue)


@dataclass(frozen=True)
class Settings:
    handshake_timeout: float = 5.0
    write_timeout: float = 10.0
    message_read_timeout: float = 30.0
    close_timeout: float = 5.0
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 20.0


class Owner:
    """Records what the timers told it; answers pings only when told to."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.pongs: list[Callable[[], None]] = []
        self.can_ping = True

    def ping(self, on_pong: Callable[[], None]) -> bool:
        if not self.can_ping:
            return False
        self.events.append("ping")
        self.pongs.append(on_pong)
        return True

    def head_timed_out(self) -> None:
        self.events.append("head")

    def write_timed_out(self) -> None:
        self.events.append("write")

    def message_timed_out(self) -> None:
        self.events.append("message")

    def close_timed_out(self) -> None:
        self.events.append("close")

    def heartbeat_missed(self) -> None:
        self.events.append("missed")


def make(settings: Settings | None = None) -> tuple[FakeLoop, Owner, ConnTimers]:
    loop, owner = FakeLoop(), Owner()
    return loop, owner, ConnTimers(loop, settings or Settings(), owner)


def test_the_request_head_deadline_fires_unless_the_head_completes() -> None:
    loop, owner, timers = make()
    timers.start_head()
    loop.advance(4.9)
    assert owner.events == []
    loop.advance(0.1)
    assert owner.events == ["head"] and timers.head is None
    timers.start_head()
    timers.stop_head()
    loop.advance(10)
    assert owner.events == ["head"] and loop.pending == 0


def test_the_write_timeout_runs_from_the_first_full_buffer_until_it_drains() -> None:
    loop, owner, timers = make()
    timers.start_write()
    loop.advance(6)
    timers.start_write()  # still full: the deadline does not move
    loop.advance(4)
    assert owner.events == ["write"]
    timers.start_write()
    loop.advance(9)
    timers.stop_write()  # drained in time
    loop.advance(5)
    assert owner.events == ["write"] and loop.pending == 0


def test_a_message_in_progress_must_complete_in_time_and_idle_is_never_limited() -> None:
    loop, owner, timers = make()
    timers.track_message(False)
    loop.advance(100)
    assert owner.events == [] and loop.pending == 0
    timers.track_message(True)
    loop.advance(20)
    timers.track_message(True)  # more of the same message: the deadline stays
    loop.advance(10)
    assert owner.events == ["message"]
    timers.track_message(True)
    loop.advance(29)
    timers.track_message(False)  # completed
    loop.advance(60)
    assert owner.events == ["message"]


def test_heartbeat_pings_on_a_fixed_ticker_and_reports_one_missed_pong() -> None:
    loop, owner, timers = make()
    timers.start_heartbeat()
    loop.advance(30)
    assert owner.events == ["ping"]
    loop.advance(5)
    owner.pongs.pop()()  # answered: no deadline left
    loop.advance(25)  # t = 60: the next tick, on schedule
    assert owner.events == ["ping", "ping"]
    loop.advance(20)  # no pong within the timeout
    assert owner.events == ["ping", "ping", "missed"]
    loop.advance(10)  # t = 90: ticking goes on; the owner decides what a miss means
    assert owner.events[-1] == "ping"


def test_heartbeat_sends_no_second_ping_while_one_is_outstanding() -> None:
    loop, owner, timers = make(Settings(heartbeat_interval=10.0, heartbeat_timeout=25.0))
    timers.start_heartbeat()
    loop.advance(30)  # ticks at 10, 20, 30: only the first pings
    assert owner.events == ["ping"]
    loop.advance(5)  # 25 s after the ping
    assert owner.events == ["ping", "missed"]


def test_a_ping_that_cannot_be_sent_arms_no_deadline() -> None:
    loop, owner, timers = make()
    owner.can_ping = False
    timers.start_heartbeat()
    loop.advance(100)
    assert owner.events == [] and timers.pong is None


def test_closing_stops_every_timer_but_the_close_handshake_and_gone_stops_that() -> None:
    loop, owner, timers = make()
    timers.start_head()
    timers.start_write()
    timers.track_message(True)
    timers.start_heartbeat()
    timers.start_close()
    timers.stop_open()
    assert loop.pending == 1
    loop.advance(5)
    assert owner.events == ["close"]
    timers.start_close()
    timers.start_close()  # once
    assert loop.pending == 1
    timers.stop_all()
    loop.advance(100)
    assert owner.events == ["close"] and loop.pending == 0


def test_probe_alive_silent_or_unreachable_decides_exactly_once() -> None:
    loop, owner = FakeLoop(), Owner()
    verdicts: list[str] = []

    def run() -> None:
        probe(owner, loop, 0.4, lambda: verdicts.append("alive"), lambda: verdicts.append("dead"))

    run()
    loop.advance(0.3)
    owner.pongs.pop()()
    owner.events.clear()
    loop.advance(1)
    assert verdicts == ["alive"] and loop.pending == 0

    run()
    loop.advance(0.4)
    owner.pongs.pop()()  # too late: already decided
    assert verdicts == ["alive", "dead"]

    owner.can_ping = False
    run()
    assert verdicts == ["alive", "dead", "dead"] and loop.pending == 0


def test_exported_timers_resume_with_what_was_left_less_the_lag() -> None:
    loop, owner, timers = make()
    timers.start_heartbeat()
    loop.advance(30.0)  # ticked: a ping is out, its pong due 20 s later
    assert owner.events == ["ping"]
    timers.start_write()
    loop.advance(4.0)
    state = timers.export()
    assert (state.tick, state.pong, state.write, state.message) == (26.0, 16.0, 6.0, None)

    # The successor's timers, on its own loop, 1 s of handover later.
    loop2, owner2, timers2 = make()
    timers2.start_write()  # (its transport paused at once: a full write timeout)
    timers2.restore(state, lag=1.0)
    loop2.advance(4.9)
    assert owner2.events == []
    loop2.advance(0.2)  # 6 - 1 s: the same write deadline as before the handover
    assert owner2.events == ["write"]
    loop2.advance(10.0)  # 16 - 1 s after the handover the pong is missed
    assert owner2.events == ["write", "missed"]
    loop2.advance(10.0)  # the ticker keeps its phase: next tick 26 - 1 s after
    assert owner2.events == ["write", "missed", "ping"]


def test_a_message_in_progress_keeps_its_deadline_across_a_handover() -> None:
    loop, _, timers = make()
    timers.track_message(True)
    loop.advance(25.0)
    state = timers.export()
    assert state.message == 5.0
    loop2, owner2, timers2 = make()
    timers2.track_message(True)  # the replayed bytes start a fresh deadline...
    timers2.restore_message(state, lag=1.0)  # ...which the predecessor's replaces
    loop2.advance(3.9)
    assert owner2.events == []
    loop2.advance(0.2)
    assert owner2.events == ["message"]
