"""The bench's load: binaries that echo envelopes, phones that check every frame.

Owns: the three scenarios (closed-loop throughput, open-loop latency, idle capacity) and
their per-run counters. A binary echoes every routed envelope back unchanged, so the relay
routes the frame back to its phone (one phone round trip = 4 frames through the relay). A
phone remembers every frame it sent, in order, and compares each frame it gets back with
the oldest outstanding one byte for byte: that checks integrity and order at once, and
whatever is still outstanding after the drain is lost.
Must never: run unbounded (every phase has a deadline), or schedule an open-loop send
later because an earlier reply was late (latency is taken from the scheduled send time).
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


async def _open(
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


def _conns(binaries: list[Binary], phones: list[Phone]) -> list[Binary | Phone]:
    return [*phones, *binaries]


def _close_all(ctx: Ctx, binaries: list[Binary], phones: list[Phone]) -> None:
    ctx.ending = True
    for obj in _conns(binaries, phones):
        if obj.ws is not None:
            ctx.c.protocol_errors += obj.ws.protocol_errors
            obj.ws.close()


async def _drain(ctx: Ctx, phones: list[Phone]) -> None:
    if ctx.outstanding > 0:
        ctx.idle_drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await ctx.idle_drained.wait()
    ctx.c.lost += sum(len(ph.pending) for ph in phones)


def _percentiles(rtts: list[float]) -> dict[str, float | None]:
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


def _result(ctx: Ctx, seconds: float, client_cpu: float) -> dict[str, Any]:
    c = ctx.c
    n = len(c.rtts)
    return {
        "rps": round(n / seconds, 1),
        **_percentiles(c.rtts),
        "n": n,
        "sent": c.sent,
        "received": c.received,
        **c.error_fields(),
        "close_notices": c.close_notices,
        "client_cpu_pct": client_cpu,
        "client_bound": client_cpu >= 90.0,
        "ok": n > 0 and c.errors() == 0,
    }


async def closed_loop(
    target: Target,
    *,
    b: int,
    p: int,
    d: int,
    size: int,
    warmup: float,
    dur: float,
    sample: Callable[[], None] | None = None,
    loaded: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Every phone keeps D frames in flight; a reply sends the next (scenario a).

    `sample` runs at both ends of the measured window, `loaded` after the drain while
    every connection is still open (blocking there costs no measured latency)."""
    ctx = Ctx(size)
    binaries, phones, _ = await _open(ctx, target, b, p)
    live = [ph for ph in phones if ph.ws is not None]
    stopping = False

    def next_frame(ph: Phone) -> None:
        if not stopping:
            ph.send(time.perf_counter())  # flushed by the phone's read callback

    ctx.on_reply = next_frame
    t0 = time.perf_counter()
    ctx.window = (t0 + warmup, t0 + warmup + dur)
    for ph in live:
        for _ in range(d):
            ph.send(t0)
        assert ph.ws is not None
        ph.ws.flush()
    await asyncio.sleep(warmup)
    cpu = CpuClock()
    cpu.start()
    if sample is not None:
        sample()
    await asyncio.sleep(dur)
    client_cpu = cpu.pct()
    if sample is not None:
        sample()
    stopping = True
    await _drain(ctx, live)
    if loaded is not None:
        loaded()
    _close_all(ctx, binaries, phones)
    out = _result(ctx, dur, client_cpu)
    out.update(mode="closed", b=b, p=p, d=d, size=size, warmup=warmup, dur=dur)
    return out


async def open_loop(
    target: Target,
    *,
    phones_n: int,
    per_binary: int,
    rate: float,
    size: int,
    warmup: float,
    dur: float,
    sample: Callable[[], None] | None = None,
    loaded: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """`phones_n` phones, each sending `rate` frames/s on a fixed schedule (scenario b).
    `sample` and `loaded` as in `closed_loop`.

    The k-th frame overall is due at t0 + k/(phones_n*rate) on phone k mod phones_n; the
    scheduler sends everything that is due whenever it wakes, and each frame's latency is
    taken from its due time, so a slow reply never delays the next send and a late wake-up
    counts against the measured latency (no coordinated omission).
    """
    ctx = Ctx(size)
    b = -(-phones_n // per_binary)
    binaries, phones, _ = await _open(ctx, target, b, per_binary)
    phones = phones[:phones_n]
    for extra in [*phones[phones_n:]]:
        if extra.ws is not None:
            extra.ws.close()
    total_rate = phones_n * rate
    step = 1.0 / total_rate
    t0 = time.perf_counter() + 0.05
    end = t0 + warmup + dur
    ctx.window = (t0 + warmup, end)
    k = 0
    lag: list[float] = []
    cpu = CpuClock()
    cpu_started = False
    while True:
        now = time.perf_counter()
        if not cpu_started and now >= t0 + warmup:
            cpu.start()
            cpu_started = True
            if sample is not None:
                sample()
        due = t0 + k * step
        if due >= end:
            break
        touched: list[Phone] = []
        while due <= now and due < end:
            ph = phones[k % phones_n]
            if ph.ws is not None and not ph.ws.closed:
                ph.send(due)
                touched.append(ph)
            k += 1
            due = t0 + k * step
        for ph in touched:
            assert ph.ws is not None
            ph.ws.flush()
        if touched:
            lag.append(time.perf_counter() - (due - step))
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
    client_cpu = cpu.pct() if cpu_started else 0.0
    if sample is not None:
        sample()
    await _drain(ctx, phones)
    if loaded is not None:
        loaded()
    _close_all(ctx, binaries, phones)
    out = _result(ctx, dur, client_cpu)
    lag.sort()
    lag_p99 = lag[int(0.99 * (len(lag) - 1))] if lag else 0.0
    # The scheduler sleeps until the next due time, which below the loop's 1 ms timer
    # resolution means it spins: its CPU share is not load. The client is bound when it
    # cannot keep the schedule, i.e. when sends start late.
    out["client_bound"] = lag_p99 > 0.001
    out.update(
        mode="open",
        phones=phones_n,
        rate_per_phone=rate,
        offered_rps=total_rate,
        size=size,
        warmup=warmup,
        dur=dur,
        service_p50_ms=_percentiles(ctx.c.service)["p50_ms"],
        service_p99_ms=_percentiles(ctx.c.service)["p99_ms"],
        send_lag_p99_ms=round(lag_p99 * 1000, 3) if lag else None,
        client_cpu_note="includes spin-waiting for due times",
    )
    return out


async def idle(
    target: Target,
    *,
    connections: int,
    per_binary: int,
    hold: float,
    settle: float,
    rss: Callable[[], int | None],
    cpu_window: Callable[[float], Any],
) -> dict[str, Any]:
    """`connections` WebSockets (binaries + phones), one round trip each, held for
    `hold` seconds while pings are answered (scenario c)."""
    ctx = Ctx(64)
    b = -(-connections // (per_binary + 1))
    p_total = connections - b
    rss_before = rss()
    binaries, phones_all, connect_s = await _open(ctx, target, b, per_binary)
    phones = phones_all[:p_total]
    for extra in phones_all[p_total:]:
        if extra.ws is not None:
            ctx.ending = True
            extra.ws.close()
            ctx.ending = False
    opened = sum(o.ws is not None for o in _conns(binaries, phones))
    ctx.idle_drained = asyncio.Event()
    live = [ph for ph in phones if ph.ws is not None]
    now = time.perf_counter()
    for ph in live:
        ph.send(now)
        assert ph.ws is not None
        ph.ws.flush()
    try:
        async with asyncio.timeout(30):
            await ctx.idle_drained.wait()
    except TimeoutError:
        pass
    ctx.c.lost += sum(len(ph.pending) for ph in live)
    await asyncio.sleep(settle)
    rss_loaded = rss()
    cpu = CpuClock()
    cpu.start()
    relay_idle_cpu = await cpu_window(hold)
    client_cpu = cpu.pct()
    still_open = sum(o.ws is not None and not o.ws.closed for o in _conns(binaries, phones))
    pings = sum(o.ws.pings_answered for o in _conns(binaries, phones) if o.ws is not None)
    _close_all(ctx, binaries, phones)
    c = ctx.c
    per_conn = None
    if rss_before is not None and rss_loaded is not None and opened:
        per_conn = round((rss_loaded - rss_before) / opened, 2)
    return {
        "mode": "idle",
        "connections": opened,
        "binaries": b,
        "phones": p_total,
        "round_trips": c.received,
        "connect_s": round(connect_s, 3),
        "handshakes_per_s": round(opened / connect_s, 1),
        "rss_before_kib": rss_before,
        "rss_loaded_kib": rss_loaded,
        "kib_per_conn": per_conn,
        "hold_s": hold,
        "relay_idle_cpu_pct": relay_idle_cpu,
        "client_cpu_pct": client_cpu,
        "pings_answered": pings,
        "still_open": still_open,
        **c.error_fields(),
        "ok": opened == connections
        and still_open == opened
        and c.errors() == 0
        and c.received == p_total,
    }
