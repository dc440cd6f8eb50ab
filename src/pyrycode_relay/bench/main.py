"""`pyrycode-relay bench`: run one scenario against one or more relays, write one JSON.

Owns: argument parsing, starting the relays it measures (our relay, the Go stand-in, the
same-stack echo server) pinned to one CPU while the bench pins itself to another, reading
their CPU and RSS from /proc, interleaving repetitions, and the JSON summary (medians per
relay, ratios against the Go relay and the echo ceiling).
Must never: target anything but a loopback address, leave a relay it started running, or
run unbounded (every phase has a deadline; a run is at most warm-up + duration + drain).

    pyrycode-relay bench closed --relay self,go,echo --go-relay /tmp/anchors/bin/go-relay
    pyrycode-relay bench open --relay self,go --phones 5000 --rate 1
    pyrycode-relay bench idle --relay self --connections 10000 --hold 65
    pyrycode-relay bench closed --url ws://127.0.0.1:8080 --pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from pyrycode_relay import __version__
from pyrycode_relay.bench import load

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# -- /proc --------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of `pid` (all its threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuSampler:
    """A process's CPU share of one core between consecutive `sample()` calls."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.points: list[tuple[float, float]] = []

    def sample(self) -> None:
        if self.pid is None:
            return
        cpu = proc_cpu_s(self.pid)
        if cpu is not None:
            self.points.append((time.perf_counter(), cpu))

    def pct(self) -> float | None:
        if len(self.points) < 2:
            return None
        (w0, c0), (w1, c1) = self.points[0], self.points[-1]
        return round(100 * (c1 - c0) / (w1 - w0), 1)


# -- relays -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "relay_version": __version__,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_argv(kind: str, port: int, args: argparse.Namespace) -> list[str]:
    listen = f"127.0.0.1:{port}"
    if kind == "self":
        return [
            sys.executable,
            "-m",
            "pyrycode_relay",
            "--insecure-listen",
            listen,
            "--max-connections",
            "30000",
            "--rate-limit-burst",
            "0",
            "--metrics-listen",
            "",
            "--heartbeat-interval",
            str(args.heartbeat_interval),
            *args.relay_arg,
        ]
    if kind == "go":
        if not args.go_relay:
            raise SystemExit("bench: --go-relay PATH is needed for the go relay")
        return [args.go_relay, "--insecure-listen", listen]
    if kind == "echo":
        return [
            sys.executable,
            "-m",
            "pyrycode_relay.bench.echo",
            listen,
            str(args.echo_write_high),
        ]
    raise SystemExit(f"bench: unknown relay {kind!r} (self, go, echo)")


@contextlib.contextmanager
def started(kind: str, args: argparse.Namespace) -> Iterator[tuple[load.Target, int]]:
    """A fresh relay of `kind` on a free loopback port, pinned to --relay-cpu."""
    port = free_port()
    argv = relay_argv(kind, port, args)
    late_pin = False
    if args.relay_cpu is not None:
        if shutil.which("taskset"):
            # taskset pins before exec, so every thread the relay starts (Go's runtime
            # threads too) inherits the CPU; it then execs, so the pid is the relay's.
            argv = ["taskset", "-c", str(args.relay_cpu), *argv]
        else:
            late_pin = True  # pins the main thread right after start: fine for Python
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if late_pin:
        os.sched_setaffinity(proc.pid, {args.relay_cpu})
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"bench: {kind} relay exited with {proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {kind} relay did not listen within 20 s")
            time.sleep(0.05)
        time.sleep(0.3)  # let it finish start-up work before we measure its baseline
        yield load.Target("127.0.0.1", port, echo=kind == "echo"), proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def given(url: str, pid: int | None) -> Iterator[tuple[load.Target, int | None]]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "ws" or host not in LOOPBACK or parts.port is None:
        raise SystemExit("bench: --url must be ws://<loopback>:PORT")
    yield load.Target("::1" if host == "::1" else "127.0.0.1", parts.port), pid


# -- scenarios ----------------------------------------------------------------------


async def run_scenario(
    args: argparse.Namespace, target: load.Target, pid: int | None, rate: float | None = None
) -> dict[str, Any]:
    sampler = CpuSampler(pid)
    if args.scenario == "closed":
        out = await load.closed_loop(
            target,
            b=args.b,
            p=args.p,
            d=args.d,
            size=args.size,
            warmup=args.warmup,
            dur=args.dur,
            sample=sampler.sample,
        )
    elif args.scenario == "open":
        assert rate is not None
        out = await load.open_loop(
            target,
            phones_n=args.phones,
            per_binary=args.p,
            rate=rate,
            size=args.size,
            warmup=args.warmup,
            dur=args.dur,
            sample=sampler.sample,
        )
    else:

        async def cpu_window(seconds: float) -> float | None:
            sampler.sample()
            await asyncio.sleep(seconds)
            sampler.sample()
            return sampler.pct()

        def rss() -> int | None:
            return proc_rss_kib(pid) if pid is not None else None

        return await load.idle(
            target,
            connections=args.connections,
            per_binary=args.p,
            hold=args.hold,
            settle=args.settle,
            rss=rss,
            cpu_window=cpu_window,
        )
    out["relay_cpu_pct"] = sampler.pct()
    if pid is not None:
        out["relay_rss_kib"] = proc_rss_kib(pid)
    return out


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(nums), 3) if nums else None


SUMMARY_KEYS = {
    "closed": ("rps", "p50_ms", "p99_ms", "p999_ms", "relay_cpu_pct", "client_cpu_pct"),
    "open": (
        "rps",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "service_p50_ms",
        "service_p99_ms",
        "send_lag_p99_ms",
        "relay_cpu_pct",
        "client_cpu_pct",
    ),
    "idle": (
        "kib_per_conn",
        "rss_before_kib",
        "rss_loaded_kib",
        "handshakes_per_s",
        "relay_idle_cpu_pct",
        "client_cpu_pct",
        "pings_answered",
    ),
}


def summarise(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for tag in dict.fromkeys((r["relay"], r.get("rate")) for r in runs):
        rs = [r["result"] for r in runs if (r["relay"], r.get("rate")) == tag]
        key = tag[0] if tag[1] is None else f"{tag[0]}@{tag[1]:g}"
        g: dict[str, Any] = {k: _median([r.get(k) for r in rs]) for k in SUMMARY_KEYS[scenario]}
        g["runs"] = len(rs)
        g["ok"] = all(r.get("ok") for r in rs)
        g["client_bound_runs"] = sum(bool(r.get("client_bound")) for r in rs)
        if scenario != "idle":
            g["rps_min_max"] = [min(r["rps"] for r in rs), max(r["rps"] for r in rs)]
        groups[key] = g
    ratios: dict[str, float | None] = {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    for key, g in groups.items():
        relay, _, rate = key.partition("@")
        if relay != "self":
            continue
        go = groups.get("go" + (f"@{rate}" if rate else ""))
        echo = groups.get("echo" + (f"@{rate}" if rate else ""))
        suffix = f"@{rate}" if rate else ""
        if go is not None:
            for k in ("rps", "p99_ms", "kib_per_conn"):
                if k in g:
                    ratios[f"{k}_self_over_go{suffix}"] = ratio(g[k], go[k])
        if echo is not None and "rps" in g:
            ratios[f"rps_self_over_echo{suffix}"] = ratio(g["rps"], echo["rps"])
    return {"relays": groups, "ratios": ratios}


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="pyrycode-relay bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("scenario", choices=("closed", "open", "idle"))
    ap.add_argument(
        "--relay",
        default="self",
        help="comma list of relays to start: self, go, echo (default self)",
    )
    ap.add_argument("--url", help="measure a running relay instead (ws://127.0.0.1:PORT)")
    ap.add_argument("--pid", type=int, help="with --url: the relay's pid for CPU and RSS")
    ap.add_argument(
        "--go-relay",
        default=os.environ.get("PYRYCODE_BENCH_GO_RELAY", ""),
        help="path of the Go stand-in relay binary",
    )
    ap.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        help="extra flag for our relay (repeatable, e.g. --relay-arg=--log-level=error)",
    )
    ap.add_argument("--heartbeat-interval", default="30s", help="our relay's heartbeat [30s]")
    ap.add_argument(
        "--echo-write-high",
        type=int,
        default=1 << 20,
        help="echo server's send-buffer allowance; 0 = one write per frame like phones",
    )
    ap.add_argument("--relay-cpu", type=int, help="default: the first CPU we may use")
    ap.add_argument("--bench-cpu", type=int, help="default: the second CPU we may use")
    ap.add_argument("--no-pin", action="store_true", help="do not pin relay or bench")
    ap.add_argument("--reps", type=int, default=1, help="interleaved repetitions per relay")
    ap.add_argument("-b", type=int, default=10, help="binaries (closed)")
    ap.add_argument("-p", type=int, default=10, help="phones per binary")
    ap.add_argument("-d", type=int, default=1, help="frames in flight per phone (closed)")
    ap.add_argument("--size", type=int, default=64, help="phone frame bytes")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--dur", type=float, default=5.0)
    ap.add_argument("--phones", type=int, default=5000, help="phones (open)")
    ap.add_argument("--rate", default="1", help="frames/s per phone, comma list (open)")
    ap.add_argument("--connections", type=int, default=10000, help="total (idle)")
    ap.add_argument("--hold", type=float, default=65.0, help="idle hold seconds")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before the RSS read")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    if args.p > 16 or args.p < 1:
        ap.error("-p must be 1..16 (the per-server-id phone cap)")
    if args.dur <= 0 or args.dur > 600 or args.hold > 600 or args.reps > 20:
        ap.error("bounded runs only: --dur/--hold ≤ 600 s, --reps ≤ 20")
    if args.connections > 30000 or args.b * args.p > 20000 or args.phones > 20000:
        ap.error("at most 30,000 connections")
    allowed = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(allowed) < 2:
        args.relay_cpu = args.bench_cpu = None
    else:
        if args.relay_cpu is None:
            args.relay_cpu = allowed[0]
        if args.bench_cpu is None:
            args.bench_cpu = next(c for c in allowed if c != args.relay_cpu)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    if args.bench_cpu is not None:
        os.sched_setaffinity(0, {args.bench_cpu})
    rates = [float(r) for r in args.rate.split(",")] if args.scenario == "open" else [None]
    relays = ["url"] if args.url else [r.strip() for r in args.relay.split(",") if r.strip()]
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = relays if rep % 2 == 0 else relays[::-1]
        for rate in rates:
            for kind in order:
                if args.scenario == "idle" and kind == "echo":
                    continue
                ctx = given(args.url, args.pid) if kind == "url" else started(kind, args)
                with ctx as (target, pid):
                    result = _run(run_scenario(args, target, pid, rate))
                entry: dict[str, Any] = {"relay": kind, "rep": rep + 1, "result": result}
                if rate is not None:
                    entry["rate"] = rate
                runs.append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)
    summary = summarise(args.scenario, runs)
    doc = {
        "bench": args.scenario,
        "argv": argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "pinning": {"relay_cpu": args.relay_cpu, "bench_cpu": args.bench_cpu},
        **summary,
        "all_ok": all(r["result"].get("ok") for r in runs),
        "runs": runs,
    }
    text = json.dumps(doc, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0 if doc["all_ok"] else 1
