"""The bench's three scenarios, and one run of a scenario against the servers it measures.

Owns: closed-loop throughput (every phone keeps D frames in flight), open-loop latency (a fixed
send schedule, latency from the scheduled time) and idle capacity (connections held through
heartbeats, RSS per connection), and `run_scenario`, which adds the servers' CPU share and RSS
(summed over every process that serves the load, and each apart when there are several) and the
rest of the machine's CPU to a scenario's result.
Must never: run unbounded (every phase has a deadline), or schedule an open-loop send later
because an earlier reply was late (no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from pyrycode_relay.tools.bench import load
from pyrycode_relay.tools.bench.load import CpuClock, Ctx, Phone, Target
from pyrycode_relay.tools.bench.procfs import CpuSampler, MachineSampler, proc_rss_kib
from pyrycode_relay.tools.bench.servers import Running


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
    binaries, phones, _ = await load.open_conns(ctx, target, b, p)
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
    await load.drain(ctx, live)
    if loaded is not None:
        loaded()
    load.close_all(ctx, binaries, phones)
    out = load.figures(ctx, dur, client_cpu)
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
    ctx: Ctx | None = None,
) -> dict[str, Any]:
    """`phones_n` phones, each sending `rate` frames/s on a fixed schedule (scenario b).
    `sample` and `loaded` as in `closed_loop`; `ctx`, when given, is the run's (the
    caller reads its counters and timeline afterwards).

    The k-th frame overall is due at t0 + k/(phones_n*rate) on phone k mod phones_n; the
    scheduler sends everything that is due whenever it wakes, and each frame's latency is
    taken from its due time, so a slow reply never delays the next send and a late wake-up
    counts against the measured latency (no coordinated omission).
    """
    ctx = Ctx(size) if ctx is None else ctx
    b = -(-phones_n // per_binary)
    binaries, phones, _ = await load.open_conns(ctx, target, b, per_binary)
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
    await load.drain(ctx, phones)
    if loaded is not None:
        loaded()
    load.close_all(ctx, binaries, phones)
    out = load.figures(ctx, dur, client_cpu)
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
        service_p50_ms=load.percentiles(ctx.c.service)["p50_ms"],
        service_p99_ms=load.percentiles(ctx.c.service)["p99_ms"],
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
    binaries, phones_all, connect_s = await load.open_conns(ctx, target, b, per_binary)
    phones = phones_all[:p_total]
    for extra in phones_all[p_total:]:
        if extra.ws is not None:
            ctx.ending = True
            extra.ws.close()
            ctx.ending = False
    opened = sum(o.ws is not None for o in load.conns(binaries, phones))
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
    still_open = sum(o.ws is not None and not o.ws.closed for o in load.conns(binaries, phones))
    pings = sum(o.ws.pings_answered for o in load.conns(binaries, phones) if o.ws is not None)
    load.close_all(ctx, binaries, phones)
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


async def run_scenario(
    args: argparse.Namespace, running: Running, rate: float | None = None
) -> dict[str, Any]:
    """One run of `args.scenario` against `running` (at `rate` per phone when open loop),
    with the servers' CPU share and RSS added to the scenario's own figures."""
    target, procs = running.target, running.procs
    samplers = {name: CpuSampler(pid) for name, pid in procs.items()}
    machine_sampler = MachineSampler()

    def sample() -> None:
        machine_sampler.sample()
        for sampler in samplers.values():
            sampler.sample()

    if args.scenario == "closed":
        out = await closed_loop(
            target,
            b=args.b,
            p=args.p,
            d=args.d,
            size=args.size,
            warmup=args.warmup,
            dur=args.dur,
            sample=sample,
            loaded=running.loaded,
        )
    elif args.scenario == "open":
        assert rate is not None
        out = await open_loop(
            target,
            phones_n=args.phones,
            per_binary=args.p,
            rate=rate,
            size=args.size,
            warmup=args.warmup,
            dur=args.dur,
            sample=sample,
            loaded=running.loaded,
        )
    else:
        pid = procs.get("relay")
        sampler = CpuSampler(pid)

        async def cpu_window(seconds: float) -> float | None:
            sampler.sample()
            await asyncio.sleep(seconds)
            sampler.sample()
            return sampler.pct()

        def rss() -> int | None:
            return proc_rss_kib(pid) if pid is not None else None

        return await idle(
            target,
            connections=args.connections,
            per_binary=args.p,
            hold=args.hold,
            settle=args.settle,
            rss=rss,
            cpu_window=cpu_window,
        )
    # Server-side CPU and RSS: the sum over every process that serves the load (one
    # relay, or both cluster instances and redis-server), and each apart when several.
    cpu = {name: sampler.pct() for name, sampler in samplers.items()}
    rss_kib = {name: proc_rss_kib(pid) for name, pid in procs.items()}
    out["relay_cpu_pct"] = _total(cpu)
    if procs:
        out["relay_rss_kib"] = _total(rss_kib)
    if len(procs) > 1:
        for name in procs:
            out[f"relay_cpu_pct_{name}"] = cpu[name]
            out[f"relay_rss_kib_{name}"] = rss_kib[name]
    total_cpu, rps = out["relay_cpu_pct"], out["rps"]
    busy = machine_sampler.pct()
    if busy is not None and total_cpu is not None and args.scenario == "closed":
        # Anything but the measured servers and this client (another job on a shared
        # machine) shows up here; a few % is the kernel's own work. Closed loop only:
        # /proc/stat is sampled per clock tick, and the open-loop scheduler, which wakes
        # and sleeps between ticks, makes the figure swing ±50 % on an idle machine.
        out["other_cpu_pct"] = round(busy - total_cpu - out["client_cpu_pct"], 1)
    # Server CPU per round trip: the cost figure that does not depend on who saturates.
    out["relay_cpu_us_per_rt"] = round(total_cpu * 1e4 / rps, 1) if total_cpu and rps else None
    return out


def _total(values: dict[str, Any]) -> Any:
    """The sum (rounded like the parts), or None if any part is unknown or there is none."""
    if not values or any(v is None for v in values.values()):
        return None
    total = sum(values.values())
    return round(total, 1) if isinstance(total, float) else total
