"""The clock the pure core reads time from.

Owns: the `Clock` protocol (the relay passes `time.monotonic`; tests a clock that moves only
when told, so timing logic runs without waiting). Must never: sleep or schedule.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float:
        """Monotonic seconds."""
        ...
