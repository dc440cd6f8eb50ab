"""A clock for tests of the pure core: time moves only when the test says so."""

from __future__ import annotations


class ManualClock:
    """Satisfies `core.clock.Clock`; starts at an arbitrary non-zero time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
