"""Outbox accounting: per-phone budget, relay-wide budget, in-flight item, clear."""

from __future__ import annotations

from pyrycode_relay.core.outbox import ITEM_OVERHEAD, BufferBudget, Item, Outbox


def test_costs_and_fifo() -> None:
    budget = BufferBudget(1 << 20)
    box = Outbox(1000, budget)
    assert box.push(Item(b"a" * 100, 0))
    assert box.push(Item(None, 4401))
    assert box.queued_bytes == 100 + 2 * ITEM_OVERHEAD == budget.used
    first = box.pop()
    assert first.frame == b"a" * 100 and box.writing
    assert box.queued_bytes == 228  # the item being written still counts
    box.written()
    assert box.queued_bytes == ITEM_OVERHEAD == budget.used
    assert box.pop().close_code == 4401


def test_per_phone_budget_is_exact() -> None:
    box = Outbox(2 * (10 + ITEM_OVERHEAD), BufferBudget(1 << 20))
    assert box.push(Item(b"x" * 10, 0))
    assert box.push(Item(b"x" * 10, 0))
    assert not box.push(Item(b"", 0))  # one more byte of overhead is over
    assert len(box) == 2


def test_relay_wide_budget_is_shared() -> None:
    budget = BufferBudget(3 * ITEM_OVERHEAD)
    a, b = Outbox(1 << 20, budget), Outbox(1 << 20, budget)
    assert a.push(Item(b"", 0)) and b.push(Item(b"", 0)) and a.push(Item(b"", 0))
    assert not b.push(Item(b"", 0))
    a.clear()
    assert a.closed and budget.used == ITEM_OVERHEAD
    assert b.push(Item(b"", 0))


def test_clear_returns_inflight_and_queued_bytes() -> None:
    budget = BufferBudget(1 << 20)
    box = Outbox(1 << 20, budget)
    for _ in range(3):
        box.push(Item(b"f" * 50, 0))
    box.pop()
    box.clear()
    assert budget.used == 0 and box.queued_bytes == 0 and not box.writing
    box.written()  # a late completion after clear must not double-release
    assert budget.used == 0


def test_a_batch_of_popped_items_counts_until_written() -> None:
    budget = BufferBudget(1 << 20)
    box = Outbox(1 << 20, budget)
    for n in (10, 20, 30):
        box.push(Item(b"x" * n, 0))
    box.pop()
    box.pop()
    assert box.writing and budget.used == 60 + 3 * ITEM_OVERHEAD  # nothing released yet
    box.written()
    assert not box.writing and budget.used == 30 + ITEM_OVERHEAD == box.queued_bytes


def test_restore_counts_queued_and_inflight_items_against_both_budgets() -> None:
    budget = BufferBudget(10_000)
    outbox = Outbox(1_000, budget)
    items = [Item(b"abc", 0), Item(None, 4000)]
    outbox.restore(items, inflight=100)
    queued = 3 + ITEM_OVERHEAD + ITEM_OVERHEAD
    assert outbox.items() == items and outbox.inflight == 100
    assert outbox.queued_bytes == budget.used == queued + 100
    outbox.written()  # the batch being written when handed over is written
    assert outbox.queued_bytes == budget.used == queued
    assert outbox.pop() == items[0]
    outbox.clear()
    assert budget.used == 0
