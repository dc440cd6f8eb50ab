"""Who holds which server-id: one binary per id, its phones, and its grace window.

Owns: the registry state machine of reference §5 — claim, conflict, reclaim during grace,
identity-scoped takeover and release, grace expiry by token, the per-id phone cap, and
the counts that exclude a binary in grace.
Must never: send, close or schedule anything. It returns what changed (e.g. the phones a
reclaim evicted) and the caller does the I/O. Binaries and phones are opaque handles
compared by identity, so a stale actor (an old binary, an old grace timer) can never
undo a newer one's state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

B = TypeVar("B")
P = TypeVar("P")


class Claim(enum.Enum):
    CLAIMED = "claimed"  # the slot was free
    RECLAIMED = "reclaimed"  # the slot was in grace: taken at once, its phones evicted
    CONFLICT = "conflict"  # a live binary holds it: the caller probes the incumbent


class Register(enum.Enum):
    OK = "ok"
    NO_SERVER = "no_server"
    AT_CAP = "at_cap"


class GraceToken:
    """Identity of one armed grace window; a timer carrying an old token is stale."""

    __slots__ = ()


@dataclass(slots=True)
class _Slot(Generic[B, P]):
    binary: B
    grace: GraceToken | None = None
    phones: dict[str, P] = field(default_factory=dict)


@dataclass(slots=True)
class ClaimResult(Generic[B, P]):
    outcome: Claim
    incumbent: B | None = None  # set for CONFLICT
    evicted: list[P] = field(default_factory=list)  # set for RECLAIMED


class Registry(Generic[B, P]):
    """Single-event-loop registry: no locks, but every mutation checks identity."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot[B, P]] = {}
        self._phones = 0
        self._gracing = 0

    # -- binaries -------------------------------------------------------------------

    def claim(self, server_id: str, binary: B) -> ClaimResult[B, P]:
        slot = self._slots.get(server_id)
        if slot is None:
            self._slots[server_id] = _Slot(binary)
            return ClaimResult(Claim.CLAIMED)
        if slot.grace is None:
            return ClaimResult(Claim.CONFLICT, incumbent=slot.binary)
        evicted = self._take(slot, binary)
        return ClaimResult(Claim.RECLAIMED, evicted=evicted)

    def take_over(self, server_id: str, binary: B, incumbent: B) -> list[P] | None:
        """After a failed probe: take the slot only if `incumbent` still holds it (or
        nobody does). Returns the evicted phones, or None if another claimant won."""
        slot = self._slots.get(server_id)
        if slot is None:
            self._slots[server_id] = _Slot(binary)
            return []
        if slot.binary is not incumbent:
            return None
        return self._take(slot, binary)

    def _take(self, slot: _Slot[B, P], binary: B) -> list[P]:
        if slot.grace is not None:
            slot.grace = None
            self._gracing -= 1
        evicted = list(slot.phones.values())
        self._phones -= len(evicted)
        slot.phones.clear()
        slot.binary = binary
        return evicted

    def release(self, server_id: str, binary: B) -> GraceToken | None:
        """The binary's connection ended: open a grace window if it still holds the slot.
        Returns the token the grace timer must present to `expire`, else None."""
        slot = self._slots.get(server_id)
        if slot is None or slot.binary is not binary:
            return None
        if slot.grace is None:
            self._gracing += 1
        slot.grace = GraceToken()
        return slot.grace

    def expire(self, server_id: str, token: GraceToken) -> list[P] | None:
        """A grace timer fired. Frees the slot and returns its phones (to be closed), or
        None when the timer is stale (the slot was reclaimed or taken over meanwhile)."""
        slot = self._slots.get(server_id)
        if slot is None or slot.grace is not token:
            return None
        del self._slots[server_id]
        self._gracing -= 1
        self._phones -= len(slot.phones)
        return list(slot.phones.values())

    def surrender(self, server_id: str, binary: B | None = None) -> list[P] | None:
        """Give the slot up to another instance (cluster mode): frees it and returns its
        phones (to be evicted), or None when there is no slot or `binary` no longer holds
        it. `binary=None` drops whatever holds it."""
        slot = self._slots.get(server_id)
        if slot is None or (binary is not None and slot.binary is not binary):
            return None
        del self._slots[server_id]
        if slot.grace is not None:
            self._gracing -= 1
        self._phones -= len(slot.phones)
        return list(slot.phones.values())

    def in_grace(self, server_id: str) -> bool:
        slot = self._slots.get(server_id)
        return slot is not None and slot.grace is not None

    def server_ids(self) -> list[str]:
        """Every id this registry holds (live or in grace): what a cluster lease covers."""
        return list(self._slots)

    def binary(self, server_id: str) -> B | None:
        """The binary holding the slot, including one in grace (its sends then fail)."""
        slot = self._slots.get(server_id)
        return None if slot is None else slot.binary

    def holds(self, server_id: str, binary: B) -> bool:
        slot = self._slots.get(server_id)
        return slot is not None and slot.binary is binary

    # -- phones ---------------------------------------------------------------------

    def register_phone(self, server_id: str, conn_id: str, phone: P, cap: int) -> Register:
        slot = self._slots.get(server_id)
        if slot is None:  # checked before the cap: an empty slot is always 4404
            return Register.NO_SERVER
        if len(slot.phones) >= cap:
            return Register.AT_CAP
        slot.phones[conn_id] = phone
        self._phones += 1
        return Register.OK

    def unregister_phone(self, server_id: str, conn_id: str, phone: P) -> bool:
        slot = self._slots.get(server_id)
        if slot is None or slot.phones.get(conn_id) is not phone:
            return False  # already evicted or expired
        del slot.phones[conn_id]
        self._phones -= 1
        return True

    def phone(self, server_id: str, conn_id: str) -> P | None:
        """A phone addressable by the binary of `server_id` (cross-server ids miss)."""
        slot = self._slots.get(server_id)
        return None if slot is None else slot.phones.get(conn_id)

    # -- counts (reference §5.5) ----------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(binaries not in grace, all registered phones)."""
        return len(self._slots) - self._gracing, self._phones
