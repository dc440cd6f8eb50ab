"""The clock the pure core reads time from.

Owns: the `Clock` protocol and the real monotonic clock. Must never: sleep or schedule.
Tests pass a `ManualClock` so timing logic runs without waiting.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float:
        """Monotonic seconds."""
        ...


def monotonic() -> float:
    return time.monotonic()


class ManualClock:
    """A clock that only moves when told to (for tests of the pure core)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
