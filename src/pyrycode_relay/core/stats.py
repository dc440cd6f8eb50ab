"""Relay-wide counters, as plain integers.

Owns: every number the metrics endpoint exports that is not a live count.
Must never: take a lock, allocate per event, or know about Prometheus; the ops.metrics
collector reads these fields at scrape time, so the data path only does `+= 1`.
"""

from __future__ import annotations

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


class RelayStats:
    """Counters incremented by the data path and read by the metrics collector."""

    __slots__ = (
        "cap_rejections",
        "frames_binary_to_phone",
        "frames_phone_to_binary",
        "grace_expiries",
        "heartbeat_closes",
        "reclaim_evictions",
        "register_failures",
        "takeovers",
        "upgrade_attempts",
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

    def upgrade(self, endpoint: str, outcome: str) -> None:
        self.upgrade_attempts[(endpoint, outcome)] += 1
