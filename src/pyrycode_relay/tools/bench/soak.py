"""Soak test: churn thousands of real WebSocket connections, then check nothing leaked.

Owns: a bounded load (fixed duration, fixed concurrency, loopback only) against a relay it
starts itself or one given by URL + pid, and the leak verdict: at the end the relay's open
file descriptors (/proc/<pid>/fd) and asyncio task count (the loopback-only
`pyrycode_relay_asyncio_tasks` gauge) must be back to the idle baseline, and its RSS
(/proc/<pid>/status VmRSS) within `max(10 MiB, 10 %)` of it.
Must never: touch a non-loopback address, run without a deadline, or read the relay's
memory in any way other than /proc and its own metrics listener.

    pyrycode-relay bench soak --seconds 600 --connections 200

The load, per group of one binary and up to eight phones on one server-id:
- the binary echoes every routed frame back verbatim (the wrapped envelope is a valid
  binary envelope), lives 1-4 s, closes, and reconnects: a reconnect within grace is a
  reclaim (its phones get 4404); every third time it stays away past the grace period
  so grace expiry runs too (only when the relay was started here, with a 1 s grace);
- each phone connects, does a few round trips checked byte for byte, and leaves: usually
  with a close handshake, every fourth time by dropping TCP. A refusal or eviction
  (4404) just counts and retries.

Why the baseline is taken after a warm-up batch: the first connections trigger one-time
allocations (lazily imported codecs, interned strings, pymalloc arenas, the rate-limit
and cap tables' first entries), which are not leaks. Why RSS gets a margin while fds and
tasks get none: CPython and glibc keep freed memory in arenas and free lists instead of
returning it to the OS, so RSS after a load settles somewhat above the idle figure even
without a leak, whereas a socket or task is either released or not. 10 MiB is about
1 KiB per connection of a 10 000-connection run, and far below what one leaked buffer per
connection would cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import websockets
from websockets.asyncio.client import ClientConnection

from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.procfs import fd_count, live_rss_kib
from pyrycode_relay.tools.bench.spawn import Child, relay_async

PHONES_PER_GROUP = 8
ROUND_TRIPS = 4
STEP_TIMEOUT = 5.0  # any single connect / round trip; a stuck one is counted, not waited on
SELF_GRACE = 1.0  # grace period of a relay started here
RSS_MARGIN_KIB = 10 * 1024
RSS_MARGIN_RATIO = 0.10
FD_MARGIN = 0
TASK_MARGIN = 0


@dataclass
class Counters:
    opened: int = 0  # WebSocket upgrades that succeeded (phones and binaries)
    round_trips: int = 0
    refused: int = 0  # 4404 and other relay-side closes the load expects
    mismatches: int = 0  # an echo that differed from what was sent: must stay 0
    timeouts: int = 0
    errors: int = 0


@dataclass
class Load:
    """What every worker of one load run shares."""

    url: str
    deadline: float  # loop time after which no new cycle starts
    counters: Counters
    grace: float | None  # the relay's grace period when known (then expiry is exercised)
    think: float  # pause between a phone's cycles


@dataclass
class Snapshot:
    rss_kib: int
    fds: int
    tasks: int


@dataclass
class SoakReport:
    seconds: float
    connections: int
    baseline: Snapshot
    end: Snapshot
    peak_rss_kib: int
    frames_routed: int
    counters: Counters
    relay_error_lines: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


# -- observing the relay process ---------------------------------------------------------


async def http_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        async with asyncio.timeout(STEP_TIMEOUT):
            raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path}: {head[:40]!r}")
    return body


async def metrics(port: int) -> dict[str, float]:
    series = {}
    for line in (await http_get(port, "/metrics")).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


def frames_total(m: dict[str, float]) -> int:
    return int(sum(v for k, v in m.items() if k.startswith("pyrycode_relay_frames_forwarded")))


async def snapshot(pid: int, metrics_port: int) -> Snapshot:
    tasks = int((await metrics(metrics_port))["pyrycode_relay_asyncio_tasks"])
    return Snapshot(live_rss_kib(pid), fd_count(pid), tasks)


async def settle(
    pid: int, port: int, metrics_port: int, target: Snapshot, limit: float
) -> Snapshot:
    """Waits (bounded) until the relay has no live pairs and its fds and tasks are back at
    `target`; returns the last snapshot either way."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while True:
        health = json.loads(await http_get(port, "/healthz"))
        snap = await snapshot(pid, metrics_port)
        idle = health["connected_binaries"] == 0 and health["connected_phones"] == 0
        if idle and snap.fds <= target.fds + FD_MARGIN and snap.tasks <= target.tasks + TASK_MARGIN:
            return snap
        if loop.time() >= end:
            return snap
        await asyncio.sleep(0.2)


async def stable(pid: int, metrics_port: int) -> Snapshot:
    """The idle baseline: a snapshot once fds and tasks held still for a second (bounded),
    so closes still in flight from the warm-up are not counted as the baseline."""
    last = await snapshot(pid, metrics_port)
    still = 0
    for _ in range(100):
        await asyncio.sleep(0.2)
        snap = await snapshot(pid, metrics_port)
        still = still + 1 if (snap.fds, snap.tasks) == (last.fds, last.tasks) else 0
        last = snap
        if still >= 5:
            break
    return last


# -- the load ------------------------------------------------------------------------------


def _headers(endpoint: str, server_id: str) -> dict[str, str]:
    if endpoint == "server":
        return {"X-Pyrycode-Server": server_id, "X-Pyrycode-Version": "0.11.0"}
    return {"X-Pyrycode-Server": server_id, "X-Pyrycode-Token": "soak-token"}


async def _connect(url: str, endpoint: str, server_id: str) -> ClientConnection:
    return await websockets.connect(
        f"{url}/v1/{endpoint}",
        additional_headers=_headers(endpoint, server_id),
        user_agent_header="pyry/0.11.0" if endpoint == "server" else "soak/1",
        compression=None,
        open_timeout=STEP_TIMEOUT,
        close_timeout=1,
        ping_interval=None,
    )


async def _open(load: Load, endpoint: str, server_id: str) -> ClientConnection | None:
    """One connection attempt, counted; a refused one backs off briefly (bounded loop)."""
    try:
        ws = await _connect(load.url, endpoint, server_id)
    except (OSError, TimeoutError, websockets.InvalidStatus):
        load.counters.errors += 1
        await asyncio.sleep(0.1)
        return None
    load.counters.opened += 1
    return ws


async def binary_worker(load: Load, server_id: str, rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    deadline, c, grace = load.deadline, load.counters, load.grace
    cycle = 0
    while loop.time() < deadline:
        cycle += 1
        ws = await _open(load, "server", server_id)
        if ws is None:
            continue
        try:
            async with asyncio.timeout(
                max(0.0, min(deadline, loop.time() + rng.uniform(1, 4)) - loop.time())
            ):
                async for msg in ws:
                    if isinstance(msg, str) and '"frame":' in msg:
                        await ws.send(msg)  # the wrapped envelope is a valid reply as is
        except TimeoutError:
            pass
        except websockets.ConnectionClosed:
            c.refused += 1  # e.g. 4409 while a previous self is still being probed
        await ws.close()
        if grace is not None and cycle % 3 == 0 and loop.time() + grace < deadline:
            await asyncio.sleep(grace + 0.2)  # let the grace period expire this time


async def phone_worker(load: Load, server_id: str, wid: int) -> None:
    loop = asyncio.get_running_loop()
    deadline, c, think = load.deadline, load.counters, load.think
    cycle = 0
    while loop.time() < deadline:
        cycle += 1
        ws = await _open(load, "client", server_id)
        if ws is None:
            continue
        try:
            for i in range(ROUND_TRIPS):
                payload = f'{{"w":{wid},"c":{cycle},"i":{i},"pad":"{"p" * (i * 40)}"}}'
                await ws.send(payload)
                async with asyncio.timeout(STEP_TIMEOUT):
                    reply = await ws.recv()
                if reply != payload:
                    c.mismatches += 1
                c.round_trips += 1
        except websockets.ConnectionClosed:
            c.refused += 1  # 4404: no binary yet, or evicted by a reclaim / grace expiry
            await asyncio.sleep(0.05)
        except TimeoutError:
            c.timeouts += 1
        if cycle % 4 == 0:
            ws.transport.abort()  # an abrupt drop: no close frame
        with contextlib.suppress(Exception):
            await ws.close()
        if think:
            await asyncio.sleep(think)


async def drive(
    url: str, seconds: float, connections: int, c: Counters, *, grace: float | None, think: float
) -> None:
    loop = asyncio.get_running_loop()
    load = Load(url, loop.time() + seconds, c, grace, think)
    rng = random.Random(8)
    groups = max(1, connections // (PHONES_PER_GROUP + 1))
    phones = max(1, connections - groups)
    tag = os.urandom(3).hex()
    workers = [
        binary_worker(load, f"soak-{tag}-{g}", random.Random(rng.random())) for g in range(groups)
    ]
    workers += [phone_worker(load, f"soak-{tag}-{w % groups}", w) for w in range(phones)]
    # Each worker stops starting cycles at the deadline; the last one is bounded by the
    # step timeouts, so the whole load is bounded by seconds + a few step timeouts.
    async with asyncio.timeout(seconds + 4 * STEP_TIMEOUT + 10):
        await asyncio.gather(*workers)


# -- orchestration -----------------------------------------------------------------------


async def _wait_ready(port: int) -> None:
    """Until the relay on `port` answers /healthz (bounded)."""
    async with asyncio.timeout(15):
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                await http_get(port, "/healthz")
                return
            await asyncio.sleep(0.05)


async def run_soak(
    seconds: float,
    connections: int,
    *,
    url: str | None = None,
    pid: int | None = None,
    metrics_port: int | None = None,
    think: float = 0.0,
    warmup: float = 1.0,
) -> SoakReport:
    """Runs the soak and returns its report; `report.ok` is the verdict. Without `url`
    a relay is started (and stopped) here on loopback ports."""
    grace: float | None = None
    error_lines = 0
    async with contextlib.AsyncExitStack() as stack:
        relay: Child | None = None
        if url is None:
            port, metrics_port = free_port(), free_port()
            relay = await stack.enter_async_context(
                relay_async(
                    f"--insecure-listen=127.0.0.1:{port}",
                    f"--metrics-listen=127.0.0.1:{metrics_port}",
                    f"--max-connections={2 * connections + 100}",
                    "--rate-limit-burst=0",
                    f"--grace-period={SELF_GRACE}s",
                    port=port,
                    timeout=15,
                    grace=15,
                )
            )
            pid, url, grace = relay.pid, f"ws://127.0.0.1:{port}", SELF_GRACE
        else:
            if pid is None or metrics_port is None:
                raise ValueError("--url needs --pid and --metrics-port")
            host_port = url.rsplit("/", 1)[-1]
            host, _, p = host_port.rpartition(":")
            if host not in ("127.0.0.1", "localhost", "[::1]"):
                raise ValueError("the soak only runs against loopback")
            port = int(p)
        settle_limit = (grace if grace is not None else 30.0) + 15.0
        await _wait_ready(port)
        warm = Counters()
        await drive(url, warmup, min(connections, 18), warm, grace=grace, think=think)
        await settle(pid, port, metrics_port, Snapshot(0, 1 << 30, 1 << 30), settle_limit)
        baseline = await stable(pid, metrics_port)
        frames_before = frames_total(await metrics(metrics_port))

        c = Counters()
        peak = baseline.rss_kib

        async def sample_peak() -> None:
            nonlocal peak
            while True:
                peak = max(peak, live_rss_kib(pid))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_peak())
        t0 = time.monotonic()
        try:
            await drive(url, seconds, connections, c, grace=grace, think=think)
        finally:
            sampler.cancel()
        elapsed = time.monotonic() - t0
        end = await settle(pid, port, metrics_port, baseline, settle_limit)
        frames = frames_total(await metrics(metrics_port)) - frames_before
        if relay is not None:
            # Stopped before its log is read, so the lines of its shutdown count too.
            await relay.stop_async(15)
            error_lines = sum("level=ERROR" in line for line in relay.log_text().splitlines())
    report = SoakReport(round(elapsed, 1), connections, baseline, end, peak, frames, c, error_lines)
    rss_limit = baseline.rss_kib + max(RSS_MARGIN_KIB, int(baseline.rss_kib * RSS_MARGIN_RATIO))
    if end.fds > baseline.fds + FD_MARGIN:
        report.failures.append(f"fds {baseline.fds} -> {end.fds}")
    if end.tasks > baseline.tasks + TASK_MARGIN:
        report.failures.append(f"tasks {baseline.tasks} -> {end.tasks}")
    if end.rss_kib > rss_limit:
        report.failures.append(f"rss {baseline.rss_kib} KiB -> {end.rss_kib} KiB (> {rss_limit})")
    if c.mismatches:
        report.failures.append(f"{c.mismatches} echoes differed from what was sent")
    if report.relay_error_lines:
        report.failures.append(f"{report.relay_error_lines} ERROR lines in the relay log")
    if c.round_trips == 0:
        report.failures.append("no frame was routed")
    return report


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pyrycode-relay bench soak", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--connections", type=int, default=100, help="concurrent connections")
    ap.add_argument("--think-ms", type=float, default=0.0, help="pause between phone cycles")
    ap.add_argument("--url", help="ws://127.0.0.1:PORT of a running relay (needs --pid)")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--metrics-port", type=int)
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= 24 * 3600 or not 0 < args.connections <= 5000:
        ap.error("--seconds must be in (0, 86400] and --connections in (0, 5000]")
    report = asyncio.run(
        run_soak(
            args.seconds,
            args.connections,
            url=args.url,
            pid=args.pid,
            metrics_port=args.metrics_port,
            think=args.think_ms / 1000,
        )
    )
    print(report.to_json())
    return 0 if report.ok else 1
