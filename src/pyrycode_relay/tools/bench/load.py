"""The bench's load: binaries that echo envelopes, phones that check every frame.

Owns: opening, draining and closing one run's connections, their per-run counters and the
result fields every scenario shares (scenarios.py runs them). A binary echoes every routed
envelope back unchanged, so the relay routes the frame back to its phone (one phone round
trip = 4 frames through the relay). A phone remembers every frame it sent, in order, and
compares each frame it gets back with the oldest outstanding one byte for byte: that checks
integrity and order at once, and whatever is still outstanding after the drain is lost.
Must never: run unbounded (the drain has a deadline), or count a frame that came back
changed or out of order as received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyrycode_relay.tools.bench.wire import WsClient, connect

CONNECT_CONCURRENCY = 256
DRAIN_TIMEOUT = 5.0


@dataclass
class Counters:
    sent: int = 0
    received: int = 0
    seq_errors: int = 0  # a returned frame that was outstanding, but not the oldest
    frame_errors: int = 0  # a returned frame that was never sent (changed bytes)
    lost: int = 0  # still outstanding after the drain
    env_errors: int = 0  # a binary got something that is not a routed envelope
    close_notices: int = 0
    conn_errors: int = 0  # connections that failed to open or ended before the end
    protocol_errors: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    rtts: list[float] = field(default_factory=list)  # seconds, in the window only
    # From the moment the frame was actually queued for writing (open loop: the send may
    # start after its due time by the bench's own timer lag; reported apart, never instead).
    service: list[float] = field(default_factory=list)

    def error_fields(self) -> dict[str, Any]:
        """Every error counter (and the close codes seen) for a result's JSON."""
        return {
            "seq_errors": self.seq_errors,
            "frame_errors": self.frame_errors,
            "lost": self.lost,
            "env_errors": self.env_errors,
            "conn_errors": self.conn_errors,
            "protocol_errors": self.protocol_errors,
            "closes": self.closes,
        }

    def errors(self) -> int:
        return (
            self.seq_errors
            + self.frame_errors
            + self.lost
            + self.env_errors
            + self.conn_errors
            + self.protocol_errors
        )


class Ctx:
    """What every connection of one run shares."""

    def __init__(self, size: int) -> None:
        self.c = Counters()
        self.size = size
        self.window: tuple[float, float] = (float("inf"), float("inf"))
        self.ending = False  # closes from now on are ours
        self.on_reply: Callable[[Phone], None] | None = None  # closed loop: send the next
        self.idle_drained: asyncio.Event | None = None
        self.outstanding = 0
        # When set: (due time, round-trip time) of every frame that came back, in order
        # (the handover scenario looks at the frames due around the handover).
        self.timeline: list[tuple[float, float]] | None = None

    def closed(self, code: int | None) -> None:
        if not self.ending:
            self.c.conn_errors += 1
            key = str(code)
            self.c.closes[key] = self.c.closes.get(key, 0) + 1


class Binary:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.ws: WsClient | None = None

    def on_text(self, env: bytes) -> None:
        if env.startswith(b'{"conn_id":"client-'):
            if b',"frame":' in env:
                assert self.ws is not None
                self.ws.queue_text(env)  # flushed at the end of this read
                return
            if b',"close_code":' in env:
                self.ctx.c.close_notices += 1
                return
        self.ctx.c.env_errors += 1


class Phone:
    __slots__ = ("ctx", "pending", "seq", "ws")

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.ws: WsClient | None = None
        self.pending: deque[tuple[bytes, float, float]] = deque()
        self.seq = 0

    def send(self, t: float) -> None:
        """Queue one frame whose latency is measured from `t` (loop clock)."""
        self.seq += 1
        head = b'{"seq":%d,"t":%d,"pad":"' % (self.seq, int(t * 1e9))
        pad = max(0, self.ctx.size - len(head) - 2)
        frame = head + b"x" * pad + b'"}'
        self.pending.append((frame, t, time.perf_counter()))
        self.ctx.outstanding += 1
        self.ctx.c.sent += 1
        assert self.ws is not None
        self.ws.queue_text(frame)

    def on_text(self, frame: bytes) -> None:
        ctx = self.ctx
        c = ctx.c
        pending = self.pending
        if not pending:
            c.frame_errors += 1
            return
        expected, t, sent_at = pending.popleft()
        ctx.outstanding -= 1
        if frame != expected:
            if any(frame == f for f, _, _ in pending):
                c.seq_errors += 1
            else:
                c.frame_errors += 1
            return
        c.received += 1
        now = time.perf_counter()
        if ctx.timeline is not None:
            ctx.timeline.append((t, now - t))
        lo, hi = ctx.window
        if lo <= t < hi:
            c.rtts.append(now - t)
            c.service.append(now - sent_at)
        if ctx.on_reply is not None:
            ctx.on_reply(self)
        if ctx.outstanding == 0 and ctx.idle_drained is not None:
            ctx.idle_drained.set()


@dataclass
class Target:
    """Where the load connects: binaries to `host:port`, phones there too unless
    `phone_host`/`phone_port` name another address (a cluster: every phone on the
    instance that does not hold its binary)."""

    host: str
    port: int
    echo: bool = False  # a plain echo server: phones only, no headers, path /echo
    phone_host: str | None = None
    phone_port: int | None = None

    @property
    def phones(self) -> tuple[str, int]:
        return self.phone_host or self.host, self.phone_port or self.port


async def open_conns(
    ctx: Ctx, target: Target, b: int, p: int
) -> tuple[list[Binary], list[Phone], float]:
    """B binaries, then P phones on each (at `target.phones`, once every binary is up);
    returns them and the connect wall time."""
    run_id = os.urandom(3).hex()
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    binaries = [Binary(ctx) for _ in range(0 if target.echo else b)]
    phones = [Phone(ctx) for _ in range(b * p)]

    async def open_one(
        obj: Binary | Phone, addr: tuple[str, int], path: str, headers: list[tuple[str, str]]
    ) -> None:
        async with sem:
            ws = await connect(
                addr[0],
                port=addr[1],
                path=path,
                headers=headers,
                on_text=obj.on_text,
                on_close=ctx.closed,
            )
        if ws is None:
            ctx.c.conn_errors += 1
        obj.ws = ws

    t0 = time.perf_counter()
    if not target.echo:
        await asyncio.gather(
            *(
                open_one(
                    bn,
                    (target.host, target.port),
                    "/v1/server",
                    [
                        ("X-Pyrycode-Server", f"bench-{run_id}-{i}"),
                        ("X-Pyrycode-Version", "bench"),
                        ("User-Agent", "pyrycode-relay-bench"),
                    ],
                )
                for i, bn in enumerate(binaries)
            )
        )
    await asyncio.gather(
        *(
            open_one(
                ph,
                target.phones,
                "/echo" if target.echo else "/v1/client",
                []
                if target.echo
                else [
                    ("X-Pyrycode-Server", f"bench-{run_id}-{i // p}"),
                    ("X-Pyrycode-Token", "bench"),
                    ("X-Pyrycode-Device-Name", "bench"),
                    ("User-Agent", "pyrycode-relay-bench"),
                ],
            )
            for i, ph in enumerate(phones)
        )
    )
    return binaries, phones, time.perf_counter() - t0


def conns(binaries: list[Binary], phones: list[Phone]) -> list[Binary | Phone]:
    return [*phones, *binaries]


def close_all(ctx: Ctx, binaries: list[Binary], phones: list[Phone]) -> None:
    ctx.ending = True
    for obj in conns(binaries, phones):
        if obj.ws is not None:
            ctx.c.protocol_errors += obj.ws.protocol_errors
            obj.ws.close()


async def drain(ctx: Ctx, phones: list[Phone]) -> None:
    if ctx.outstanding > 0:
        ctx.idle_drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await ctx.idle_drained.wait()
    ctx.c.lost += sum(len(ph.pending) for ph in phones)


def percentiles(rtts: list[float]) -> dict[str, float | None]:
    if not rtts:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    s = sorted(rtts)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": at(1.0)}


class CpuClock:
    """This process's CPU share of one core between start() and stop() (getrusage)."""

    def start(self) -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu, self._wall = r.ru_utime + r.ru_stime, time.perf_counter()

    def pct(self) -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return round(
            100 * (r.ru_utime + r.ru_stime - self._cpu) / (time.perf_counter() - self._wall), 1
        )


def figures(ctx: Ctx, seconds: float, client_cpu: float) -> dict[str, Any]:
    c = ctx.c
    n = len(c.rtts)
    return {
        "rps": round(n / seconds, 1),
        **percentiles(c.rtts),
        "n": n,
        "sent": c.sent,
        "received": c.received,
        **c.error_fields(),
        "close_notices": c.close_notices,
        "client_cpu_pct": client_cpu,
        "client_bound": client_cpu >= 90.0,
        "ok": n > 0 and c.errors() == 0,
    }
