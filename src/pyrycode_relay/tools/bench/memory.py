"""Measure the relay's memory per idle connection and per buffered byte (docs/operations.md).

Owns: starting the real relay (`python -m pyrycode_relay`) on loopback, loading it in stages
and reading its resident set size (VmRSS in /proc/<pid>/status, Linux only) after each:

1. after start-up and a warm-up pair (so lazily imported code is already resident);
2. after opening half of --connections and then all of them as idle WebSockets: one binary
   per 16 phones, every phone registered, as in production (phones dominate);
3. after the binaries queue frames to stalled phones (phones that never read) until the
   relay's `pyrycode_relay_outbox_bytes` gauge reaches --buffered.

Must never: open more than --connections connections or queue more than --buffered bytes,
wait without a deadline, or leave the relay running (its connections are dropped, then it
is stopped).

    pyrycode-relay bench memory --connections 10000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import websockets
from websockets.asyncio.client import ClientConnection

from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.procfs import live_rss_kib
from pyrycode_relay.tools.bench.spawn import relay_async

PHONES_PER_BINARY = 16
FRAME = b'{"fill":"' + b"x" * (64 * 1024 - 12) + b'"}'  # a 64 KiB JSON frame


async def settled_rss(pid: int) -> int:
    """RSS once it stops moving (the relay has finished reacting to what we did)."""
    last = -1
    for _ in range(50):
        await asyncio.sleep(0.2)
        now = live_rss_kib(pid) * 1024
        if now == last:
            return now
        last = now
    return last


async def outbox_bytes(metrics_port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = await reader.read()
    writer.close()
    for line in body.decode().splitlines():
        if line.startswith("pyrycode_relay_outbox_bytes "):
            return int(float(line.split()[1]))
    raise RuntimeError("no pyrycode_relay_outbox_bytes")


async def dial(url: str, endpoint: str, server_id: str, **kw: object) -> ClientConnection:
    headers = {"X-Pyrycode-Server": server_id}
    if endpoint == "server":
        headers["X-Pyrycode-Version"] = "0.0.0"
    else:
        headers["X-Pyrycode-Token"] = "measure"
    return await websockets.connect(
        f"{url}/v1/{endpoint}",
        additional_headers=headers,
        user_agent_header="measure/1",
        compression=None,
        max_size=1 << 20,
        **kw,  # type: ignore[arg-type]
    )


async def open_group(url: str, group: int, phones: int) -> list[ClientConnection]:
    sid = f"mem-{group}"
    conns = [await dial(url, "server", sid)]
    conns += await asyncio.gather(*(dial(url, "client", sid) for _ in range(phones)))
    return conns


async def measure(connections: int, buffered: int) -> None:
    port, metrics_port = free_port(), free_port()
    async with relay_async(
        f"--insecure-listen=127.0.0.1:{port}",
        f"--metrics-listen=127.0.0.1:{metrics_port}",
        f"--max-connections={connections + 100}",
        "--rate-limit-burst=0",  # every dial comes from 127.0.0.1
        f"--max-buffered-bytes={buffered * 2}",
        "--phone-outbox-bytes=8MiB",
        "--write-timeout=120s",  # a stalled phone must stay stalled, not be closed
        port=port,
    ) as relay:
        await _load(relay.pid, f"ws://127.0.0.1:{port}", metrics_port, connections, buffered)


async def _load(pid: int, url: str, metrics_port: int, connections: int, buffered: int) -> None:
    """The three stages against the relay `pid` at `url`, printing each stage's figures."""
    held: list[ClientConnection] = []
    warm: list[ClientConnection] = []
    try:
        async with asyncio.timeout(300):
            warm = await open_group(url, -1, 1)
            await warm[1].send('{"warm":1}')
            await warm[0].recv()
            base = await settled_rss(pid)
            print(f"relay pid {pid}; baseline RSS {base / 2**20:.1f} MiB")
            per_group = PHONES_PER_BINARY + 1
            group = 0
            for target in (connections // 2, connections):
                while len(held) + per_group <= target:
                    held += await open_group(url, group, PHONES_PER_BINARY)
                    group += 1
                rss = await settled_rss(pid)
                print(
                    f"{len(held):5d} idle connections: RSS {rss / 2**20:7.1f} MiB, "
                    f"{(rss - base) / len(held) / 1024:5.1f} KiB per connection"
                )
            before = await settled_rss(pid)
            # Stalled phones: fresh groups whose phones never read after their first frame
            # (max_queue=1: websockets stops reading, so TCP back-pressure reaches the relay).
            targets: list[tuple[ClientConnection, str]] = []
            for i in range(4):
                sid = f"stall-{i}"
                b = await dial(url, "server", sid)
                held.append(b)
                for _ in range(4):
                    p = await dial(url, "client", sid, max_queue=1)
                    held.append(p)
                    await p.send("{}")
                    env = str(await b.recv())
                    targets.append((b, env.split('"conn_id":"', 1)[1].split('"', 1)[0]))
            sent = queued = 0
            deadline = time.monotonic() + 120
            while queued < buffered and time.monotonic() < deadline:
                for b, cid in targets:
                    await b.send(f'{{"conn_id":"{cid}","frame":'.encode() + FRAME + b"}")
                    sent += len(FRAME)
                queued = await outbox_bytes(metrics_port)
            rss = await settled_rss(pid)
            print(
                f"{queued / 2**20:.1f} MiB queued in outboxes (of {sent / 2**20:.1f} MiB sent): "
                f"RSS +{(rss - before) / 2**20:.1f} MiB, "
                f"{(rss - before) / max(queued, 1):.2f} bytes of RSS per queued byte"
            )
    finally:
        # Dropped before the relay stops: it has nothing to drain and exits at once.
        for ws in [*warm, *held]:
            ws.transport.abort()


def main(argv: list[str]) -> int:
    if not sys.platform.startswith("linux"):
        raise SystemExit("needs /proc (Linux)")
    parser = argparse.ArgumentParser(
        prog="pyrycode-relay bench memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--buffered", type=int, default=64 << 20, help="bytes to queue")
    args = parser.parse_args(argv)
    if not 0 < args.connections <= 10_000 or not 0 < args.buffered <= 1 << 30:
        raise SystemExit("bounded: --connections 1..10000, --buffered up to 1 GiB")
    asyncio.run(measure(args.connections, args.buffered))
    return 0
