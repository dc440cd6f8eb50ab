"""Relay-wide counters and histograms, as plain numbers.

Owns: every number the metrics endpoint exports that is not a live count, and the bucket
bounds of the two histograms.
Must never: take a lock, allocate per event, know about Prometheus, or be observed per
frame; the ops.metrics collector reads these fields at scrape time, so the data path only
does `+= 1`, and a histogram is observed once when a WebSocket opens and once when it ends.
"""

from __future__ import annotations

from bisect import bisect_left

ENDPOINTS = ("server", "client")
UPGRADE_OUTCOMES = (
    "accept",
    "reject_headers",
    "reject_409",
    "reject_404",
    "reject_429",
    "reject_rate_limit",
)
REGISTER_FAILURE_KINDS = ("no_server", "server_in_use", "phones_at_cap", "ratelimit")
CAP_SCOPES = ("global", "per_ip")

# Seconds from an accepted connection to its 101 written. Locally this is well under a
# millisecond; the upper buckets catch a slow request head (bounded by --handshake-timeout,
# 5 s) and, in cluster mode, a binary's claim waiting on Redis.
UPGRADE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Seconds from the 101 to the end of the WebSocket: refusals (4404/4409/4429) end within
# the first bucket; phones come and go in minutes, binaries stay for hours or days.
LIFETIME_BUCKETS = (
    0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86400.0, 7 * 86400.0,
)  # fmt: skip


class Histogram:
    """Observation counts per bucket (not cumulative: the collector adds them up at scrape
    time), their sum and, implicitly, their count. A value lands in the first bucket whose
    bound is >= it (Prometheus's `le`); the last slot is +Inf."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class RelayStats:
    """Counters incremented by the data path and read by the metrics collector."""

    __slots__ = (
        "cap_rejections",
        "connection_seconds",
        "frames_binary_to_phone",
        "frames_phone_to_binary",
        "grace_expiries",
        "heartbeat_closes",
        "reclaim_evictions",
        "register_failures",
        "takeovers",
        "upgrade_attempts",
        "upgrade_seconds",
    )

    def __init__(self) -> None:
        self.frames_phone_to_binary = 0
        self.frames_binary_to_phone = 0
        self.grace_expiries = 0
        self.takeovers = 0
        self.reclaim_evictions = 0
        # keyed by (endpoint, outcome); every combination exists from startup
        self.upgrade_attempts: dict[tuple[str, str], int] = {
            (e, o): 0 for e in ENDPOINTS for o in UPGRADE_OUTCOMES
        }
        self.register_failures: dict[str, int] = dict.fromkeys(REGISTER_FAILURE_KINDS, 0)
        self.heartbeat_closes: dict[str, int] = dict.fromkeys(ENDPOINTS, 0)
        self.cap_rejections: dict[str, int] = dict.fromkeys(CAP_SCOPES, 0)
        # by endpoint: accepted connection → 101 written, and 101 → end of the WebSocket
        self.upgrade_seconds = {e: Histogram(UPGRADE_BUCKETS) for e in ENDPOINTS}
        self.connection_seconds = {e: Histogram(LIFETIME_BUCKETS) for e in ENDPOINTS}

    def upgrade(self, endpoint: str, outcome: str) -> None:
        self.upgrade_attempts[(endpoint, outcome)] += 1
