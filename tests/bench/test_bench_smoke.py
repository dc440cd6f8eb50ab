"""CI smoke for `pyrycode-relay bench`: short runs of every scenario against a relay and
the echo server it starts itself, checking integrity and ordering (zero errors), never
speed. Plus the frame checker itself: it must notice a reordered, changed or lost frame.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyrycode_relay.tools.bench import load

BENCH = [sys.executable, "-m", "pyrycode_relay", "bench"]


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [*BENCH, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.exists(), proc.stderr[-2000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    assert proc.returncode == (0 if doc["all_ok"] else 1)
    return doc


def assert_clean(result: dict[str, Any]) -> None:
    for key in ("seq_errors", "frame_errors", "lost", "env_errors", "conn_errors"):
        assert result[key] == 0, (key, result)
    assert result["protocol_errors"] == 0, result
    assert result["ok"] is True, result


def test_closed_loop_relay_and_echo(tmp_path: Path) -> None:
    doc = run_bench(
        tmp_path, "closed", "--relay", "self,echo", "-b", "3", "-p", "4", "-d", "4",
        "--warmup", "0.3", "--dur", "1.5",
    )  # fmt: skip
    assert doc["all_ok"] is True
    assert {r["relay"] for r in doc["runs"]} == {"self", "echo"}
    for run in doc["runs"]:
        result = run["result"]
        assert_clean(result)
        assert result["n"] > 0 and result["received"] == result["sent"]
        assert result["relay_cpu_pct"] is not None
    assert doc["ratios"]["rps_self_over_echo"] is not None
    assert doc["machine"]["python"]


def test_open_loop_low_rate(tmp_path: Path) -> None:
    doc = run_bench(
        tmp_path, "open", "--relay", "self", "--phones", "40", "-p", "8", "--rate", "10",
        "--warmup", "0.3", "--dur", "1.5",
    )  # fmt: skip
    (run,) = doc["runs"]
    result = run["result"]
    assert_clean(result)
    # Open loop: the offered schedule is kept, so every due frame in the window was sent.
    assert result["n"] == pytest.approx(40 * 10 * 1.5, rel=0.05)
    assert result["received"] == result["sent"]


def test_idle_holds_and_answers_heartbeats(tmp_path: Path) -> None:
    doc = run_bench(
        tmp_path, "idle", "--relay", "self", "--connections", "120", "-p", "5",
        "--hold", "1.6", "--settle", "0.2", "--heartbeat-interval", "0.5s",
    )  # fmt: skip
    (run,) = doc["runs"]
    result = run["result"]
    assert result["ok"] is True, result
    assert result["connections"] == 120 and result["still_open"] == 120
    assert result["round_trips"] == result["phones"] == 100
    # Three heartbeat intervals held: every connection answered at least two pings.
    assert result["pings_answered"] >= 2 * 120
    assert result["kib_per_conn"] is not None and result["handshakes_per_s"] > 0


class _FakeWs:
    def __init__(self) -> None:
        self.queued: list[bytes] = []

    def queue_text(self, payload: bytes) -> None:
        self.queued.append(payload)


def _phone() -> tuple[load.Phone, _FakeWs]:
    ctx = load.Ctx(64)
    ctx.window = (0.0, float("inf"))
    phone = load.Phone(ctx)
    ws = _FakeWs()
    phone.ws = ws  # type: ignore[assignment]
    return phone, ws


def test_checker_counts_reordered_changed_and_lost_frames() -> None:
    phone, ws = _phone()
    for _ in range(4):
        phone.send(0.0)
    first, second, third, _fourth = ws.queued
    assert len(first) == 64
    phone.on_text(first)  # in order
    phone.on_text(third)  # overtakes the second
    phone.on_text(second[:-2] + b"!}")  # changed bytes
    c = phone.ctx.c
    assert (c.received, c.seq_errors, c.frame_errors) == (1, 1, 1)
    assert len(phone.pending) == 1  # the fourth was never answered: lost at the drain
    assert c.errors() == 2


async def test_closed_loop_against_a_given_url(tmp_path: Path) -> None:
    """`--url` + `--pid`: the bench measures a relay someone else started."""
    from tests.e2e.harness import run_command, start_relay

    out = tmp_path / "url.json"
    async with start_relay("--rate-limit-burst=0") as relay:
        code, log = await run_command(
            [*BENCH, "closed", "--url", relay.url, "--pid", str(relay.proc.pid), "--no-pin",
             "-b", "2", "-p", "3", "-d", "2", "--warmup", "0.2", "--dur", "1", "--out", str(out)]
        )  # fmt: skip
    assert code == 0, log[-2000:]
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert run["relay"] == "url"
    assert_clean(run["result"])
    assert run["result"]["n"] > 0 and run["result"]["relay_cpu_pct"] is not None


async def test_phones_to_another_url(tmp_path: Path) -> None:
    """`--phone-url`: phones connect to a second address (here the same relay by another
    name, so no cluster is needed); the pid given twice is counted once."""
    from tests.e2e.harness import run_command, start_relay

    out = tmp_path / "phone-url.json"
    async with start_relay("--rate-limit-burst=0") as relay:
        pid = str(relay.proc.pid)
        code, log = await run_command(
            [*BENCH, "closed", "--url", relay.url, "--pid", pid, "--no-pin",
             "--phone-url", f"ws://localhost:{relay.port}", "--phone-pid", pid,
             "-b", "2", "-p", "3", "-d", "2", "--warmup", "0.2", "--dur", "1", "--out", str(out)]
        )  # fmt: skip
    assert code == 0, log[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert_clean(run["result"])
    assert run["result"]["n"] > 0 and "relay_cpu_pct_b" not in run["result"]


def test_handover_under_load_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "handover.json"
    proc = subprocess.run(
        [*BENCH, "handover", "--connections", "60", "--rate", "10", "--warmup", "0.3",
         "--dur", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert out.exists(), proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert proc.returncode == 0 and result["ok"] is True, result
    assert result["connections_handed"] == 60 and result["old_process_gone"]
    for key in ("dropped_connections", "lost", "reordered", "unknown_or_duplicated"):
        assert result[key] == 0, (key, result)
    assert result["frames_received"] == result["frames_sent"] > 0
    assert result["pause_max_ms"] is not None and result["held_ms"] is not None
