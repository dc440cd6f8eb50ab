"""Whether this process should be sent traffic now: what `/readyz` answers.

Owns: the named readiness checks (every listener up; the TLS certificate held; Redis
reachable in cluster mode) and the draining state, and the one-line verdict built from
them. Each check is a cheap synchronous read of state that its owner keeps (the TLS
front end, the cluster bus); this module only asks.
Must never: block, do I/O, or say more than check names (no address, error or secret).
"""

from __future__ import annotations

from collections.abc import Callable


class Readiness:
    """Ready when listening, every required check passes and not draining.

    Concurrency: the event loop's thread only; `RelayServer` registers the checks and
    moves the state, the routers read `verdict()` per request.
    """

    __slots__ = ("_checks", "_listening", "draining")

    def __init__(self) -> None:
        self._checks: list[tuple[str, Callable[[], bool]]] = []
        self._listening = False
        self.draining = False

    def require(self, name: str, check: Callable[[], bool]) -> None:
        """From now on, ready only while `check()` is true (reported as `name`)."""
        self._checks.append((name, check))

    def listening(self) -> None:
        """Every listener is open."""
        self._listening = True

    def waiting_for(self) -> list[str]:
        """The names of what is missing, in a fixed order; empty when ready."""
        missing = [] if self._listening else ["listeners"]
        missing.extend(name for name, check in self._checks if not check())
        if self.draining:
            missing.append("draining")
        return missing

    def verdict(self) -> tuple[bool, str]:
        """(ready, one line of text for /readyz and the service manager's status)."""
        missing = self.waiting_for()
        if not missing:
            return True, "ready"
        return False, "not ready: " + ", ".join(missing)
