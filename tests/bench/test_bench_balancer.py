"""CI smoke for `pyrycode-relay bench --balancer haproxy`: a real redis-server, three real
relay instances and the real HAProxy from deploy/haproxy.cfg, hashing and then round-robin
in the same run. Checks that the hash kept every pair local (nothing crossed the bus) while
round-robin split some, that the balancer's CPU is reported, and that the report carries
the ratios; never speed. Also the generic form: --url with --instance-metrics.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pyrycode_relay.tools.bench import balancer
from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.spawn import relay
from tests.bench.test_bench_smoke import assert_clean, run_bench


@pytest.fixture(autouse=True)
def _programs() -> None:
    for name, found in (("redis-server", shutil.which("redis-server")),
                        ("haproxy", balancer.program("haproxy"))):  # fmt: skip
        if found is None:
            if os.environ.get("CI"):
                pytest.fail(f"{name} is missing; scripts/test.sh must install it")
            pytest.skip(f"{name} not installed (scripts/test.sh installs it)")


def test_hash_next_to_round_robin(tmp_path: Path) -> None:
    doc = run_bench(
        tmp_path, "closed", "--balancer", "haproxy", "-b", "6", "-p", "3", "-d", "2",
        "--warmup", "0.3", "--dur", "1",
    )  # fmt: skip
    assert doc["all_ok"] is True, doc
    assert [r["relay"] for r in doc["runs"]] == ["haproxy-hash", "haproxy-roundrobin"]
    by_kind = {r["relay"]: r["result"] for r in doc["runs"]}
    for result in by_kind.values():
        assert_clean(result)
        assert result["received"] == result["sent"] > 0
        assert result["frames_forwarded"] >= 2 * result["received"]
        assert result["relay_cpu_pct_balancer"] is not None
        assert result["instance_log_problems"] == {f"bench-{n}": [] for n in "123"}
        placed = result["while_loaded"]
        assert sum(v["connected_binaries"] for v in placed.values()) == 6
        assert sum(v["connected_phones"] for v in placed.values()) == 18
    hashed, rr = by_kind["haproxy-hash"], by_kind["haproxy-roundrobin"]
    assert hashed["bus_messages"] == 0 and hashed["bus_fraction"] == 0
    assert all(v["remote_phones"] == 0 for v in hashed["while_loaded"].values())
    # Round-robin over 3 instances puts about 2 of 3 phones away from their binary (which
    # ones depends on the order the connections arrive in).
    assert sum(v["remote_phones"] for v in rr["while_loaded"].values()) > 0
    assert rr["bus_messages"] > 0 and rr["bus_fraction"] > 0
    (row,) = doc["balancer"]
    assert row["hash"]["bus_fraction"] == 0 and row["roundrobin"]["bus_fraction"] > 0
    assert row["hash"]["balancer_cpu_pct"] is not None
    assert row["ratio_hash_over_roundrobin"]["frames_per_s"] == pytest.approx(
        row["hash"]["frames_per_s"] / row["roundrobin"]["frames_per_s"], abs=0.001
    )
    setup = doc["balancer_setup"]
    assert setup["version"].startswith("HAProxy version")
    assert setup["hash_line"] == "balance hdr(X-Pyrycode-Server)"


def test_instance_metrics_of_a_given_setup(tmp_path: Path) -> None:
    """--url with --instance-metrics: the bus share of relays someone else started (here a
    single cluster-less relay: its metrics have no bus series, so nothing crossed)."""
    port, metrics_port = free_port(), free_port()
    flags = ["--insecure-listen", f"127.0.0.1:{port}", "--rate-limit-burst", "0",
             "--metrics-listen", f"127.0.0.1:{metrics_port}"]  # fmt: skip
    with relay(*flags, port=port) as child:
        doc = run_bench(
            tmp_path, "closed", "--url", f"ws://127.0.0.1:{port}", "--pid", str(child.pid),
            "--balancer-pid", str(child.pid),
            "--instance-metrics", f"http://127.0.0.1:{metrics_port}/metrics",
            "-b", "2", "-p", "2", "--warmup", "0.2", "--dur", "0.5",
        )  # fmt: skip
    (run,) = doc["runs"]
    result = run["result"]
    assert_clean(result)
    assert result["bus_messages"] == 0 and result["bus_fraction"] == 0
    assert result["frames_forwarded"] >= 2 * result["received"] > 0
    assert result["relay_cpu_pct_balancer"] is not None
