"""The soak test's short form: churn, then fds, tasks and RSS back at baseline.

The long form is `pyrycode-relay bench soak --seconds 600 --connections 200`; its figures
are in docs/decisions/0009-hostile-peers-and-leak-checks.md.
"""

from __future__ import annotations

from pyrycode_relay.tools.bench.soak import run_soak


async def test_short_soak_returns_to_baseline() -> None:
    report = await run_soak(8.0, 120)
    print(report.to_json())  # shown by pytest -rA / on failure
    assert report.failures == []
    # the load really ran: thousands of connections, frames routed both ways, checked
    assert report.counters.opened >= 1000, report.counters
    assert report.counters.round_trips >= 1000, report.counters
    assert report.frames_routed >= 2 * report.counters.round_trips
    assert report.counters.mismatches == 0
    assert (report.end.fds, report.end.tasks) == (report.baseline.fds, report.baseline.tasks)
