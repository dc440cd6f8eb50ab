"""CI smoke for `pyrycode-relay bench --cluster`: a real redis-server and two real relay
instances started by the bench, every binary on one and every phone on the other, next
to a single relay in the same run. Checks that frames crossed instances intact and that
the report carries both sets of figures and their ratio, never speed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.bench.test_bench_smoke import assert_clean, run_bench


@pytest.fixture(autouse=True)
def _redis_server() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing; scripts/test.sh must install it")
        pytest.skip("redis-server not installed (scripts/test.sh installs it)")


def assert_crossed(run: dict[str, Any], binaries: int, phones: int) -> None:
    """Every phone was remote to its binary, and frames went over the bus both ways."""
    result = run["result"]
    assert "exited" not in result, result
    # Read while every connection was open: binaries all on a, phones all on b.
    assert result["while_loaded"] == {
        "bench-a": {"connected_binaries": binaries, "connected_phones": 0, "remote_phones": 0},
        "bench-b": {"connected_binaries": 0, "connected_phones": phones, "remote_phones": phones},
    }, result["while_loaded"]
    metrics = result["cluster_metrics"]
    a, b = metrics["bench-a"], metrics["bench-b"]
    assert a["redis_up"] == 1 and b["redis_up"] == 1, metrics
    # Each round trip is published once by each side (phone frame b→a, its echo a→b).
    for side in (a, b):
        assert side['bus_messages_total{direction="publish"}'] > 0, metrics
        assert side['bus_messages_total{direction="receive"}'] > 0, metrics
    assert result["relay_cpu_pct_a"] is not None and result["relay_cpu_pct_b"] is not None
    assert result["relay_cpu_pct_redis"] is not None
    assert result["instance_log_problems"] == {"bench-a": [], "bench-b": []}, result


def test_closed_loop_cluster_next_to_single(tmp_path: Path) -> None:
    doc = run_bench(
        tmp_path, "closed", "--cluster", "-b", "2", "-p", "3", "-d", "2",
        "--warmup", "0.3", "--dur", "1",
    )  # fmt: skip
    assert doc["all_ok"] is True, doc
    assert [r["relay"] for r in doc["runs"]] == ["self", "cluster"]
    for run in doc["runs"]:
        result = run["result"]
        assert_clean(result)
        assert result["n"] > 0 and result["received"] == result["sent"]
    assert_crossed(doc["runs"][1], 2, 6)
    (row,) = doc["cluster"]
    cross, single = row["cross_instance"], row["single_instance"]
    assert cross["frames_per_s"] > 0 and cross["p99_ms"] is not None
    assert single["frames_per_s"] > 0 and single["p99_ms"] is not None
    ratio = row["ratio_cross_over_single"]
    assert ratio["frames_per_s"] == pytest.approx(
        cross["frames_per_s"] / single["frames_per_s"], abs=0.001
    )
    assert ratio["p99_ms"] is not None and ratio["p99_ms"] > 0
    assert doc["ratios"]["rps_cluster_over_self"] == ratio["frames_per_s"]
    assert doc["cluster_setup"]["redis_server"].startswith("Redis server")


def test_open_loop_cluster_keeps_the_schedule(tmp_path: Path) -> None:
    doc = run_bench(
        tmp_path, "open", "--relay", "cluster", "--phones", "24", "-p", "8", "--rate", "20",
        "--warmup", "0.3", "--dur", "1",
    )  # fmt: skip
    # --relay cluster alone runs no single relay: figures, no ratio.
    (run,) = doc["runs"]
    assert run["relay"] == "cluster"
    result = run["result"]
    assert_clean(result)
    assert result["n"] == pytest.approx(24 * 20 * 1, rel=0.05)
    assert_crossed(run, 3, 24)
    (row,) = doc["cluster"]
    assert row["rate_per_phone"] == 20 and row["single_instance"] is None
