"""Push-wake admission (reference §12 steps 1-6): may this wake be sent, and if not, why.

Owns: decoding the `push_wake` value, the order of the admission checks and their sentinel
texts (reference Appendix A.9), the per-server-id token bucket and the relay-wide in-flight
count. Must never: do I/O, read the wall clock (time comes from the injected `Clock`), schedule
its sweep, or keep the device token beyond the returned decision: the caller sends it, and only
its fingerprint is ever logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from pyrycode_relay.core.clock import Clock
from pyrycode_relay.core.ratelimit import TokenBucketLimiter

ERR_PUSH_OFF: Final = "relay: push is off"
ERR_MALFORMED: Final = "relay: malformed push_wake"
ERR_PLATFORM: Final = "relay: push_wake platform not supported"
ERR_EMPTY_TOKEN: Final = "relay: push_wake token is empty"
ERR_RATE_LIMITED: Final = "relay: push_wake rate-limited for server-id"
ERR_IN_FLIGHT: Final = "relay: push_wake in-flight cap reached"

PLATFORM_FCM: Final = "fcm"

_decode_push_wake = msgspec.json.Decoder(dict[str, str]).decode


@dataclass(frozen=True, slots=True)
class Decision:
    """`token` is set for an admitted wake; otherwise `err` is the refusal's sentinel and
    `dropped` tells whether it counts as `outcome="dropped"` (only the rate limit and the
    in-flight cap do, reference §12)."""

    token: str | None = None
    err: str = ""
    dropped: bool = False


_OFF = Decision(err=ERR_PUSH_OFF)
_MALFORMED = Decision(err=ERR_MALFORMED)
_PLATFORM = Decision(err=ERR_PLATFORM)
_EMPTY_TOKEN = Decision(err=ERR_EMPTY_TOKEN)
_RATE_LIMITED = Decision(err=ERR_RATE_LIMITED, dropped=True)
_IN_FLIGHT = Decision(err=ERR_IN_FLIGHT, dropped=True)


def parse_push_wake(raw: bytes) -> dict[str, str] | None:
    """The `push_wake` value as a JSON object of strings; None for anything else (an array,
    a number, a nested value, invalid UTF-8 or JSON)."""
    try:
        return _decode_push_wake(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec raises the latter for bad UTF-8
        return None


class PushAdmission:
    """Decides wakes in the reference's order; counts admitted sends until `release`.

    `enabled` is False when push is not configured; `close()` (shutdown) makes every later
    wake report push off, exactly like an unconfigured relay.
    """

    __slots__ = ("_closed", "_enabled", "_limiter", "_max_in_flight", "in_flight")

    def __init__(
        self, *, enabled: bool, burst: int, interval: float, max_in_flight: int, clock: Clock
    ) -> None:
        if burst < 1 or max_in_flight < 1:
            raise ValueError("push burst and in-flight cap must be at least 1")
        self._enabled = enabled
        self._limiter = TokenBucketLimiter(burst, interval, clock)
        self._max_in_flight = max_in_flight
        self._closed = False
        self.in_flight = 0

    def admit(self, server_id: str, push_wake: bytes) -> Decision:
        if not self._enabled:
            return _OFF  # first: with push off even a malformed wake reports "push is off"
        fields = parse_push_wake(push_wake)
        if fields is None:
            return _MALFORMED
        if fields.get("platform") != PLATFORM_FCM:
            return _PLATFORM
        token = fields.get("token", "")
        if not token:
            return _EMPTY_TOKEN
        if self._closed:
            return _OFF
        # The bucket is asked before the cap, so a wake refused by the cap still spent a token,
        # as in the reference.
        if not self._limiter.allow(server_id):
            return _RATE_LIMITED
        if self.in_flight >= self._max_in_flight:
            return _IN_FLIGHT
        self.in_flight += 1
        return Decision(token=token)

    def release(self) -> None:
        """One admitted send has finished (whatever its outcome)."""
        if self.in_flight <= 0:
            raise RuntimeError("release without a matching admitted wake")
        self.in_flight -= 1

    def close(self) -> None:
        self._closed = True

    def sweep(self) -> int:
        """Drop idle server-id buckets; the caller schedules this (every 5 minutes)."""
        return self._limiter.sweep()

    def buckets(self) -> int:
        return len(self._limiter)
