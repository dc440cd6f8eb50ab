"""Caps on live WebSocket connections: relay-wide, and optionally per client IP.

Owns: the slot counts. Must never: block or queue (a refused request gets 503 at once), keep an
entry for an IP with no live connection (that would leak memory under address scanning), or
respond or log; the caller does that with the scope this returns.
"""

from __future__ import annotations


class ConnectionCaps:
    """Counts live connections; `per_ip_max == 0` turns the per-IP cap off."""

    __slots__ = ("_global_max", "_live", "_per_ip", "_per_ip_max")

    def __init__(self, global_max: int, per_ip_max: int) -> None:
        if global_max <= 0:
            raise ValueError("relay: connection cap must be positive")
        if per_ip_max < 0:
            raise ValueError("per-IP connection cap must not be negative")
        self._global_max = global_max
        self._per_ip_max = per_ip_max
        self._live = 0
        self._per_ip: dict[str, int] = {}

    def try_acquire(self, ip: str) -> str | None:
        """Take a slot for `ip`: None on success, else the refusing scope ("global"/"per_ip")."""
        if self._live >= self._global_max:
            return "global"
        if self._per_ip_max:
            n = self._per_ip.get(ip, 0)
            if n >= self._per_ip_max:
                return "per_ip"
            self._per_ip[ip] = n + 1
        self._live += 1
        return None

    def release(self, ip: str) -> None:
        """Give back a slot taken by a successful `try_acquire(ip)`."""
        if self._live <= 0:
            raise RuntimeError("connection cap released more often than acquired")
        if self._per_ip_max:
            n = self._per_ip.get(ip, 0)
            if n <= 0:
                raise RuntimeError("connection cap released for an IP that holds no slot")
            if n == 1:
                del self._per_ip[ip]
            else:
                self._per_ip[ip] = n - 1
        self._live -= 1

    @property
    def live(self) -> int:
        return self._live

    @property
    def tracked_ips(self) -> int:
        """IPs currently holding at least one slot (0 when the per-IP cap is off)."""
        return len(self._per_ip)
