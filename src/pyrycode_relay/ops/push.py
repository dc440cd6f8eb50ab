"""Push wake dispatch (reference §12): admission, one task per admitted wake, outcomes.

Owns: calling core.push_admission in the binary's read path, logging each refusal
(`binary_forwarder_push_wake_dropped`), dispatching each admitted wake as its own asyncio task
tracked until it ends, the outcome of each send (one log line and one counter increment), the
5-minute sweep of idle per-server-id buckets, and cancelling in-flight sends at shutdown.
Must never: make the binary's read loop wait (a wake only schedules a task), retry or queue a
refused wake, or log a device token (only `token_fp`), an access token, the key or FCM free text.
The HTTP side lives in ops.fcm, imported only when push is configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from functools import partial
from typing import Final, Protocol

from pyrycode_relay.core.clock import Clock
from pyrycode_relay.core.push_admission import PushAdmission
from pyrycode_relay.ops.log import Logger, millis

SWEEP_SECONDS: Final = 300.0  # idle-bucket sweep, like the per-IP limiter (reference §12 step 5)

OUTCOME_SENT: Final = "sent"
OUTCOME_UNREGISTERED: Final = "unregistered"
OUTCOME_TOKEN_FETCH_FAILED: Final = "token_fetch_failed"
OUTCOME_SEND_FAILED: Final = "send_failed"
OUTCOME_DROPPED: Final = "dropped"
OUTCOMES: Final = (
    OUTCOME_SENT,
    OUTCOME_UNREGISTERED,
    OUTCOME_TOKEN_FETCH_FAILED,
    OUTCOME_SEND_FAILED,
    OUTCOME_DROPPED,
)

ERR_SEND: Final = "relay: fcm send failed"
ERR_CANCELLED: Final = f"{ERR_SEND}: cancelled by shutdown"


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: str
    err: str = ""  # set for every outcome but OUTCOME_SENT
    message_id: str | None = None  # FCM's `name`, only when it is safe to log


class PushSender(Protocol):
    async def send(self, token: str) -> SendResult:
        """Send one wake; never raises except CancelledError."""
        ...

    async def aclose(self) -> None: ...


def token_fp(token: str) -> str:
    """The only form of a device token that may be logged: 8 hex chars of its SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:8]


class PushWaker:
    """The relay's push waker; disabled (every wake "push is off") when `sender` is None."""

    def __init__(
        self,
        log: Logger,
        sender: PushSender | None,
        *,
        burst: int,
        interval: float,
        max_in_flight: int,
        clock: Clock = time.monotonic,
    ) -> None:
        """`burst`/`interval`: each server-id's token bucket (--push-burst,
        --push-interval); `max_in_flight`: sends at once, relay-wide (--push-max-in-flight)."""
        self._log = log
        self._sender = sender
        self._clock = clock
        self.enabled = sender is not None
        self.admission = PushAdmission(
            enabled=self.enabled,
            burst=burst,
            interval=interval,
            max_in_flight=max_in_flight,
            clock=clock,
        )
        # Read by the metrics collector; exported only when push is on (reference §12).
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        if self.enabled:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        self.admission.sweep()
        self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def wake(self, server_id: str, binary_conn_id: str, push_wake: bytes) -> None:
        """Called from the binary's read path: decide at once, send in the background."""
        decision = self.admission.admit(server_id, push_wake)
        token = decision.token
        if token is None:
            if decision.dropped:
                self.outcomes[OUTCOME_DROPPED] += 1
            self._log.warn(
                "binary_forwarder_push_wake_dropped",
                server_id=server_id,
                binary_conn_id=binary_conn_id,
                err=decision.err,
            )
            return
        # One task per admitted wake (ADR "push wake: one asyncio task per admitted wake"):
        # wakes are rare and at most --push-max-in-flight exist at once.
        fp = token_fp(token)
        started = self._clock()
        task = self._loop.create_task(self._send(server_id, fp, token, started))
        self._tasks.add(task)
        task.add_done_callback(partial(self._done, server_id, fp, started))

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _send(self, server_id: str, fp: str, token: str, started: float) -> None:
        sender = self._sender
        assert sender is not None
        try:
            result = await sender.send(token)
        except Exception as exc:
            # A bug in the sender still ends the wake with its one line and one count.
            result = SendResult(OUTCOME_SEND_FAILED, f"{ERR_SEND}: {type(exc).__name__}")
        self._finish(server_id, fp, started, result)

    def _done(self, server_id: str, fp: str, started: float, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            # Handled here, not in _send: a task cancelled before its first step never runs
            # its body, and it must still be released, counted and logged.
            self._finish(server_id, fp, started, SendResult(OUTCOME_SEND_FAILED, ERR_CANCELLED))

    def _finish(self, server_id: str, fp: str, started: float, result: SendResult) -> None:
        self.admission.release()
        self.outcomes[result.outcome] += 1
        duration_ms = millis(max(0.0, self._clock() - started))
        log = self._log
        if result.outcome != OUTCOME_SENT:
            log.warn(
                "push_wake_send_failed",
                server_id=server_id,
                token_fp=fp,
                duration_ms=duration_ms,
                err=result.err,
            )
        elif result.message_id is not None:
            log.info(
                "push_wake_sent",
                server_id=server_id,
                token_fp=fp,
                duration_ms=duration_ms,
                fcm_message_id=result.message_id,
            )
        else:
            log.info("push_wake_sent", server_id=server_id, token_fp=fp, duration_ms=duration_ms)

    async def close(self) -> None:
        """Shutdown: later wakes report push off; in-flight sends are cancelled (each counted
        and logged as send_failed) and awaited; the HTTP pool is closed."""
        self.admission.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._sender is not None:
            await self._sender.aclose()
