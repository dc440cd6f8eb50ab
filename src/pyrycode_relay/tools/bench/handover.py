"""Live handover under load: N connections with traffic flowing, SIGUSR2 in the middle.

Owns: starting the real relay on loopback (insecure mode, as behind a TLS-terminating
proxy), running the open-loop load (scenarios.open_loop: every phone sends on a fixed
schedule, its binary echoes, the phone checks every frame byte for byte and in order), sending
SIGUSR2 halfway through the measured window, and the verdict: dropped connections and
lost, duplicated or reordered frames (all must be 0), the pause (the largest and the p99
round trip of the frames due from the signal until the old process is gone, plus one second),
the p99 before the signal for comparison, and the handover's durations from both
processes' log lines (the old process: its loop held from export to acknowledgement; the
successor: from export until it serves every connection).
Must never: touch a non-loopback address, run without a deadline, or leave the relay or
its successor running.

    pyrycode-relay bench handover --connections 1000
    pyrycode-relay bench handover --connections 10000 --rate 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from typing import Any

from pyrycode_relay.tools.bench import scenarios
from pyrycode_relay.tools.bench.load import Ctx, Target, percentiles
from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.procfs import proc_rss_kib
from pyrycode_relay.tools.bench.spawn import Child, relay_async

HANDED = 'msg="handed over; exiting"'
COMPLETE = 'msg="handover complete"'
FAILED = 'msg="handover failed; serving on"'
AFTER = 1.0  # seconds after the successor serves that still count as "during the handover"


def _field(line: str, key: str) -> str | None:
    match = re.search(rf"\b{key}=(\S+)", line)
    return match[1] if match else None


def _ms(value: str | None) -> float | None:
    """A `*_ms` log value (integer milliseconds) as a number."""
    return None if value is None or not value.isdigit() else float(value)


def _line(child: Child, needle: str, offset: int) -> str | None:
    """The first line containing `needle` that this run wrote (a kept log is appended to)."""
    with open(child.log, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if needle in line:
            return line
    return None


async def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if proc_rss_kib(pid) is None:  # gone, or a zombie nobody reaped yet
            return True
        await asyncio.sleep(0.05)
    return False


async def _stop(pid: int) -> None:
    """SIGTERM (a drain), then SIGKILL if it is still there after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not await _gone(pid, 15.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await _gone(pid, 5.0)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    flags = (
        f"--insecure-listen=127.0.0.1:{port}",
        "--metrics-listen=",
        "--max-connections=30000",
        "--rate-limit-burst=0",
        "--handover-timeout=60s",
        f"--heartbeat-interval={args.heartbeat_interval}",
    )
    phones_n = args.connections * args.per_binary // (args.per_binary + 1)
    ctx = Ctx(args.size)
    ctx.timeline = []
    successor: int | None = None
    offset: int = args.log_offset
    async with relay_async(*flags, port=port, name="relay", log=args.log) as child:
        old = child.pid
        signalled: list[float] = []
        gone_at: list[float] = []
        watch: list[asyncio.Task[None]] = []

        def sample() -> None:
            if not signalled:  # the window opens: signal halfway through it
                asyncio.get_running_loop().call_later(args.dur / 2, upgrade)

        def upgrade() -> None:
            signalled.append(time.perf_counter())
            os.kill(old, signal.SIGUSR2)
            watch.append(asyncio.create_task(note_gone()))

        async def note_gone() -> None:
            if await _gone(old, 60.0):
                gone_at.append(time.perf_counter())

        try:
            result = await scenarios.open_loop(
                Target("127.0.0.1", port),
                phones_n=phones_n,
                per_binary=args.per_binary,
                rate=args.rate,
                size=args.size,
                warmup=args.warmup,
                dur=args.dur,
                sample=sample,
                ctx=ctx,
            )
        finally:
            complete = _line(child, COMPLETE, offset)
            pid = _field(complete, "pid") if complete else None
            successor = int(pid) if pid else None
            if successor is not None:
                await _stop(successor)
        handed = _line(child, HANDED, offset)
        failed = _line(child, FAILED, offset)
        old_gone = await _gone(old, 5.0)
        for task in watch:  # the old process is gone by now, unless the handover failed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task, 5.0)
    c = ctx.c
    timeline = ctx.timeline
    during: list[float] = []
    before: list[float] = []
    if signalled:
        t_sig = signalled[0]
        t_end = (gone_at[0] if gone_at else t_sig) + AFTER
        during = [rtt for t, rtt in timeline if t_sig <= t <= t_end]
        before = [rtt for t, rtt in timeline if t < t_sig]
    pause = percentiles(during)
    out: dict[str, Any] = {
        "bench": "handover",
        "connections": args.connections,
        "phones": phones_n,
        "binaries": -(-phones_n // args.per_binary),
        "rate_per_phone": args.rate,
        "offered_rps": round(phones_n * args.rate, 1),
        "handed_over": handed is not None,
        "failure": _field(failed, "reason") if failed else None,
        "connections_handed": int(_field(handed, "connections") or 0) if handed else 0,
        "old_process_gone": old_gone,
        "signal_to_old_gone_ms": (
            round((gone_at[0] - signalled[0]) * 1000, 1) if gone_at and signalled else None
        ),
        "successor_pid_seen": successor is not None,
        "held_ms": _ms(_field(handed, "duration_ms")) if handed else None,
        "export_to_serving_ms": _ms(_field(complete, "duration_ms")) if complete else None,
        "dropped_connections": c.conn_errors,
        "lost": c.lost,
        "reordered": c.seq_errors,
        "unknown_or_duplicated": c.frame_errors,
        "frames_sent": c.sent,
        "frames_received": c.received,
        "rtt_before_p99_ms": percentiles(before)["p99_ms"],
        "pause_max_ms": pause["max_ms"],
        "pause_p99_ms": pause["p99_ms"],
        "frames_in_pause_window": len(during),
        "client_bound": result.get("client_bound"),
    }
    out["ok"] = bool(
        handed
        and old_gone
        and c.conn_errors == 0
        and c.lost == 0
        and c.seq_errors == 0
        and c.frame_errors == 0
        and c.received > 0
    )
    return out


def main(argv: list[str]) -> int:
    if not sys.platform.startswith("linux"):
        raise SystemExit("needs /proc and SCM_RIGHTS (Linux)")
    ap = argparse.ArgumentParser(
        prog="pyrycode-relay bench handover", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--connections", type=int, default=1000, help="binaries + phones")
    ap.add_argument("--per-binary", type=int, default=9, help="phones per binary (1..16)")
    ap.add_argument("--rate", type=float, default=1.0, help="frames/s per phone")
    ap.add_argument("--size", type=int, default=64, help="phone frame bytes")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--dur", type=float, default=10.0, help="measured seconds (signal at half)")
    ap.add_argument("--heartbeat-interval", default="30s")
    ap.add_argument("--log", help="keep the relay's log (both processes) in this file")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    if not 2 <= args.connections <= 30000 or not 1 <= args.per_binary <= 16:
        raise SystemExit("bounded: --connections 2..30000, --per-binary 1..16")
    if not 0 < args.dur <= 120 or not 0 <= args.warmup <= 60 or not 0 < args.rate <= 100:
        raise SystemExit("bounded: --dur ≤ 120 s, --warmup ≤ 60 s, 0 < --rate ≤ 100")
    # Where this run's lines start in a kept log (--log appends to it).
    args.log_offset = os.path.getsize(args.log) if args.log and os.path.exists(args.log) else 0
    try:
        import uvloop
    except ImportError:
        out = asyncio.run(measure(args))
    else:
        out = uvloop.run(measure(args))
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0 if out["ok"] else 1
