"""Per-phone delivery queue accounting, and the relay-wide buffered-bytes budget.

Owns: the FIFO of items waiting for one phone, each costing `len(frame) + 64` bytes
(reference §7.6), the items being written (handed to the socket layer as one batch; they
still count until that write completes), and the shared budget every outbox draws from
(`--max-buffered-bytes`).
Must never: touch a socket. The phone's writer (endpoints.client) pops items, writes
them and reports completion; overflow is reported to the caller, who closes the phone.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

ITEM_OVERHEAD = 64


class Item(NamedTuple):
    """A frame to write (may be None for a bare close directive) and a close code
    (0 = plain frame; otherwise close the phone with it after writing the frame)."""

    frame: bytes | None
    close_code: int

    @property
    def cost(self) -> int:
        return (0 if self.frame is None else len(self.frame)) + ITEM_OVERHEAD


class BufferBudget:
    """Bytes queued in all outboxes together; bounds memory whatever the phone count."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Outbox:
    """One phone's queue. States: open → closed (overflow, directive reached, teardown)."""

    __slots__ = ("_budget", "_inflight", "_items", "_limit", "closed", "queued_bytes")
    # _inflight: the summed cost of items popped for writing and not yet written

    def __init__(self, limit: int, budget: BufferBudget) -> None:
        self._limit = limit
        self._budget = budget
        self._items: deque[Item] = deque()
        self._inflight = 0
        self.queued_bytes = 0  # queued items plus those being written
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: Item) -> bool:
        """Queue `item`; False if it would exceed this phone's or the relay's budget.
        The caller then closes the phone and calls `clear()`."""
        cost = item.cost
        budget = self._budget
        if self.queued_bytes + cost > self._limit or budget.used + cost > budget.limit:
            return False
        self._items.append(item)
        self.queued_bytes += cost
        budget.used += cost
        return True

    def pop(self) -> Item:
        """Take the next item for writing; it stays counted until `written()`."""
        item = self._items.popleft()
        self._inflight += item.cost
        return item

    def written(self) -> None:
        """Every item popped so far is fully handed to the socket."""
        if self._inflight:
            self._release(self._inflight)
            self._inflight = 0

    @property
    def writing(self) -> bool:
        """Items are popped and not yet written."""
        return self._inflight != 0

    def restore(self, items: list[Item], inflight: int) -> None:
        """Refill a fresh outbox with a predecessor's (live handover): its queued items and
        the cost of those it was writing. Limits are not checked: they held when queued."""
        self._items.extend(items)
        cost = sum(item.cost for item in items) + inflight
        self._inflight = inflight
        self.queued_bytes += cost
        self._budget.used += cost

    def items(self) -> list[Item]:
        """The queued items, in order (not those being written)."""
        return list(self._items)

    @property
    def inflight(self) -> int:
        """The cost of the items being written."""
        return self._inflight

    def clear(self) -> None:
        """Close the outbox and drop everything, returning the bytes to the budget."""
        self.closed = True
        self._release(self.queued_bytes)
        self._items.clear()
        self._inflight = 0

    def _release(self, cost: int) -> None:
        self.queued_bytes -= cost
        self._budget.used -= cost
