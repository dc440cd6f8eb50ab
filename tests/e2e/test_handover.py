"""Live handover (SIGUSR2), end to end: real clients, the real relay, a real successor.

Every test sends SIGUSR2 to the relay the harness started. On success the old process exits
0 and its successor (started by it, so not the harness's child) serves on the same sockets;
the successor's log goes to the same stderr pipe, and `Upgrades` kills it when the test
ends, so no process outlives its test. The failure tests make the successor fail with the
test-only flag `--handover-test` (handover/taker.py), on which only a successor acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

from pyrycode_relay.tools.bench.ports import free_port
from tests.certs import make_ca, write_leaf
from tests.e2e.clusterharness import redis_server
from tests.e2e.harness import (
    FAST_TIMERS,
    RawWs,
    Relay,
    binary,
    closed_with,
    encode_frame,
    launch,
    paired,
    phone,
    recv_json,
    relay_command,
    run_command,
    start_relay,
)
from tests.e2e.test_readiness import next_notification, notify_socket
from tests.e2e.test_tls_acme import acme_flags, pebble, serial_in
from tests.e2e.test_tls_proxy import proxy_relay, upgrade_status, v4
from tests.e2e.tlsharness import (
    DOMAIN,
    client_context,
    plain_request,
    serial_of,
    start_tls_relay,
    tls_binary,
    tls_phone,
)

HANDOVER = "--handover-timeout=5s"
COMPLETE = 'msg="handover complete"'
FAILED = 'msg="handover failed; serving on"'
KIB = 1024
OWNER_GONE = (1011, "server owner gone")


class Upgrades:
    """Sends SIGUSR2 and follows the relay to its successors; kills them at the end."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pids: list[int] = []

    async def upgrade(self) -> int:
        """One successful handover: the successor's pid, once the old process is gone."""
        relay = self.relay
        done = relay.count_log(COMPLETE)
        os.kill(self.current, signal.SIGUSR2)
        async with asyncio.timeout(15):
            while relay.count_log(COMPLETE) == done:
                await asyncio.sleep(0.02)
        line = [x for x in relay.lines if COMPLETE in x][-1]
        match = re.search(r"pid=(\d+)", line)
        assert match is not None, line
        old = self.current
        pid = int(match[1])
        self.pids.append(pid)
        await wait_gone(old)
        if old == relay.proc.pid:
            assert await exit_code(relay) == 0
        return pid

    @property
    def current(self) -> int:
        return self.pids[-1] if self.pids else self.relay.proc.pid

    async def kill_all(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.pids:
            await wait_gone(pid)


def _alive(pid: int) -> bool:
    """Running (a zombie, not yet reaped by whoever adopted it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def exit_code(relay: Relay, timeout: float = 10.0) -> int:
    """The old process's exit code. (Not `proc.wait()`: that also waits for its output
    pipes to close, and the successor inherited them.)"""
    async with asyncio.timeout(timeout):
        while relay.proc.returncode is None:
            await asyncio.sleep(0.02)
    return relay.proc.returncode


async def wait_gone(pid: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while _alive(pid):
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def relay_with_upgrades(
    *flags: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[Relay, Upgrades]]:
    async with start_relay(HANDOVER, *flags, env=env) as relay:
        upgrades = Upgrades(relay)
        try:
            yield relay, upgrades
        finally:
            await upgrades.kill_all()


def _field(line: str, key: str) -> str:
    match = re.search(rf"\b{key}=(\S+)", line)
    assert match is not None, line
    return match[1]


def envelope(conn_id: str, frame: Any) -> str:
    return json.dumps({"conn_id": conn_id, "frame": frame})


class Traffic:
    """Numbered frames flowing both ways between a binary and its phones, continuously,
    and what each side received."""

    def __init__(self, b: ClientConnection, phones: dict[str, ClientConnection]) -> None:
        self.b = b
        self.phones = phones
        self.up_sent = dict.fromkeys(phones, 0)
        self.down_sent = dict.fromkeys(phones, 0)
        self.up_got: dict[str, list[int]] = {cid: [] for cid in phones}
        self.down_got: dict[str, list[int]] = {cid: [] for cid in phones}
        self.other: list[Any] = []  # what the binary got that is not numbered traffic
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._read_binary()))
        for cid, p in self.phones.items():
            self._tasks.append(asyncio.create_task(self._send_up(cid, p)))
            self._tasks.append(asyncio.create_task(self._read_phone(cid, p)))
        self._tasks.append(asyncio.create_task(self._send_down()))

    async def _send_up(self, cid: str, p: ClientConnection) -> None:
        for n in range(100_000):  # bounded; stopped long before
            if self._stop.is_set():
                return
            await p.send(json.dumps({"up": n}))
            self.up_sent[cid] = n + 1
            await asyncio.sleep(0.002)

    async def _send_down(self) -> None:
        for n in range(100_000):
            if self._stop.is_set():
                return
            for cid in self.phones:
                await self.b.send(envelope(cid, {"down": n}))
                self.down_sent[cid] = n + 1
            await asyncio.sleep(0.002)

    async def _read_binary(self) -> None:
        async for raw in self.b:
            env = json.loads(raw)
            frame = env.get("frame")
            if isinstance(frame, dict) and "up" in frame and env["conn_id"] in self.up_got:
                self.up_got[env["conn_id"]].append(frame["up"])
            else:
                self.other.append(env)

    async def _read_phone(self, cid: str, p: ClientConnection) -> None:
        async for raw in p:
            self.down_got[cid].append(json.loads(raw)["down"])

    async def stop_and_settle(self, timeout: float = 10.0) -> None:
        """Stop sending; wait until everything sent has arrived (or the deadline)."""
        self._stop.set()
        async with asyncio.timeout(timeout):
            while any(len(self.up_got[c]) < self.up_sent[c] for c in self.phones) or any(
                len(self.down_got[c]) < self.down_sent[c] for c in self.phones
            ):
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def assert_exact(self) -> None:
        for cid in self.phones:
            assert self.up_got[cid] == list(range(self.up_sent[cid])), cid
            assert self.down_got[cid] == list(range(self.down_sent[cid])), cid


class PingingPhone:
    """A raw phone that reads everything, answers pings and notes when they came."""

    def __init__(self, raw: RawWs) -> None:
        self.raw = raw
        self.pings: list[float] = []
        self.frames: list[bytes] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await self._read_frames()

    async def _read_frames(self) -> None:
        for _ in range(100_000):
            opcode, payload = await self.raw.read_frame(timeout=30)
            if opcode == 0x9:
                self.pings.append(time.monotonic())
                self.raw.writer.write(encode_frame(0xA, payload))
            elif opcode == 0x8:
                return
            else:
                self.frames.append(payload)


async def test_handover_keeps_every_connection_and_every_frame() -> None:
    timers = [t for t in FAST_TIMERS if not t.startswith("--heartbeat")]
    flags = [*timers, "--heartbeat-interval=300ms", "--heartbeat-timeout=20s"]
    flags += ["--phone-outbox-bytes=32MiB", "--max-buffered-bytes=64MiB"]
    async with relay_with_upgrades(*flags) as (relay, upgrades):
        b, p1, cid1 = await paired(relay, "srv-ho")
        p2 = await phone(relay, "srv-ho")
        await p2.send('{"hi":2}')
        cid2 = (await recv_json(b))["conn_id"]
        # A phone that never reads: its socket fills, then its outbox holds the rest.
        stalled = await RawWs.connect(relay, "client", "srv-ho")
        stalled.send_frame(0x1, b'{"hi":"stalled"}')
        cid_stalled = (await recv_json(b))["conn_id"]
        flood = 96
        for n in range(flood):
            await b.send(envelope(cid_stalled, {"flood": n, "pad": "x" * (64 * KIB)}))
        # A raw phone that answers pings, with a message left half-sent across the handover:
        # one complete fragment and half of the final one.
        raw = await RawWs.connect(relay, "client", "srv-ho")
        pinging = PingingPhone(raw)
        raw.send_frame(0x1, b'{"raw":"hello"}')
        cid_raw = (await recv_json(b))["conn_id"]
        last = encode_frame(0x0, b'"across"}', fin=True)
        raw.writer.write(encode_frame(0x1, b'{"frag":', fin=False) + last[:5])
        # The binary's frames are handled in order: once p1 has this one, the flood is queued.
        await b.send(envelope(cid1, {"mark": 1}))
        assert await recv_json(p1) == {"mark": 1}
        before = await relay.healthz()
        assert (before["connected_binaries"], before["connected_phones"]) == (1, 4)
        up = 'pyrycode_relay_frames_forwarded_total{direction="phone_to_binary"}'
        counted = (await relay.metrics())[up]
        assert counted >= 4

        traffic = Traffic(b, {cid1: p1, cid2: p2})
        traffic.start()
        try:
            async with asyncio.timeout(10):
                while min(traffic.up_sent.values()) < 20:
                    await asyncio.sleep(0.01)
            old = relay.proc.pid
            new = await upgrades.upgrade()
            handed_at = time.monotonic()
            assert new != old and _alive(new) and not _alive(old)
            raw.writer.write(last[5:])  # the rest of the half-sent message
            mark = max(traffic.up_sent.values())
            async with asyncio.timeout(10):
                while min(traffic.up_sent.values()) < mark + 20:
                    await asyncio.sleep(0.01)
            await traffic.stop_and_settle()
        finally:
            await traffic.close()
        traffic.assert_exact()
        assert min(traffic.up_sent.values()) > 40  # traffic flowed across the handover

        # The message that spanned the handover arrived whole, from the same conn_id.
        assert {"conn_id": cid_raw, "frame": {"frag": "across"}} in traffic.other
        # The stalled phone gets every queued frame, in order, once it reads.
        got = []
        for _ in range(flood):
            opcode, payload = await stalled.read_frame(timeout=10)
            while opcode == 0x9:  # heartbeat pings, queued behind the flood
                opcode, payload = await stalled.read_frame(timeout=10)
            got.append(json.loads(payload)["flood"])
        assert got == list(range(flood))
        # Heartbeats go on in the successor (every 300 ms; the raw phone answers them).
        async with asyncio.timeout(5):
            while not [t for t in pinging.pings if t > handed_at + 0.1]:
                await asyncio.sleep(0.02)
        # Nobody was closed; the registry is the same; a newcomer is served.
        for ws in (b, p1, p2):
            assert ws.state is State.OPEN
        assert not pinging.task.done()
        after = await relay.healthz()
        assert (after["connected_binaries"], after["connected_phones"]) == (1, 4)
        assert after["uptime_seconds"] >= before["uptime_seconds"]
        # The counters carried on: every frame the binary got since is counted once, in one
        # process or the other (the numbered traffic, and the message split across).
        assert (await relay.metrics())[up] == counted + sum(traffic.up_sent.values()) + 1
        late = await phone(relay, "srv-ho")
        await late.send('{"late":1}')
        env = await recv_json(b)
        assert env["frame"] == {"late": 1} and env["conn_id"] not in (cid1, cid2)
        # Phones still reach the binary with their old conn_ids, and back.
        await p1.send('{"again":1}')
        assert await recv_json(b) == {"conn_id": cid1, "frame": {"again": 1}}
        await b.send(envelope(cid2, {"back": 1}))
        assert await recv_json(p2) == {"back": 1}
        pinging.task.cancel()
        assert relay.count_log("level=ERROR") == 0
        await asyncio.gather(pinging.task, return_exceptions=True)


async def test_a_second_handover_follows_the_first() -> None:
    async with relay_with_upgrades() as (relay, upgrades):
        b, p, cid = await paired(relay, "srv-twice")
        opened = time.monotonic()
        await asyncio.sleep(1.0)  # an age the handovers must carry, longer than they take
        first = await upgrades.upgrade()
        second = await upgrades.upgrade()
        assert first != second and not _alive(first)
        await p.send('{"n":1}')
        assert await recv_json(b) == {"conn_id": cid, "frame": {"n": 1}}
        await b.send(envelope(cid, {"n": 2}))
        assert await recv_json(p) == {"n": 2}
        # The WebSocket's age went with it: its end counts from its 101, not the handover.
        await p.close()
        lived_ms = (time.monotonic() - opened) * 1000
        line = await relay.wait_log("msg=ws_closed endpoint=client server_id=srv-twice")
        assert 1000 <= int(_field(line, "duration_ms")) <= lived_ms + 500


async def test_grace_window_survives_the_handover() -> None:
    """A binary gone just before the handover: its phones wait out the same grace window in
    the successor, then are closed 1000 as usual; a binary back in time reclaims its id."""
    async with relay_with_upgrades("--grace-period=1500ms") as (relay, upgrades):
        b, p, _ = await paired(relay, "srv-grace")
        await b.close()
        await relay.wait_counts(0, 1)
        await upgrades.upgrade()
        assert await relay.counts() == (0, 1)
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                await p.recv()
        assert p.close_code == 1000
        await relay.wait_counts(0, 0)


async def test_a_binary_back_within_grace_after_the_handover_reclaims_its_id() -> None:
    """The grace window carried over is a real one: the binary back in the successor
    reclaims its id as it would have in the old process (its old phones are closed
    `4404 binary reclaimed server-id`), not a takeover after a probe."""
    async with relay_with_upgrades("--grace-period=5s") as (relay, upgrades):
        b, p, _ = await paired(relay, "srv-back")
        await b.close()
        await relay.wait_counts(0, 1)
        await upgrades.upgrade()
        back = await binary(relay, "srv-back")  # in the successor, within the window
        assert await closed_with(p) == (4404, "binary reclaimed server-id")
        metrics = await relay.metrics()
        assert metrics["pyrycode_relay_reclaim_evictions_total"] == 1
        assert metrics["pyrycode_relay_takeovers_total"] == 0
        again = await phone(relay, "srv-back")
        await again.send('{"n":1}')
        assert (await recv_json(back))["frame"] == {"n": 1}


async def serving_after_failure(relay: Relay, b: ClientConnection, p: ClientConnection) -> None:
    """The old process serves every connection, as before."""
    assert relay.proc.returncode is None
    await p.send('{"after":1}')
    env = await recv_json(b)
    assert env["frame"] == {"after": 1}
    await b.send(envelope(env["conn_id"], {"back": 1}))
    assert await recv_json(p) == {"back": 1}
    late = await binary(relay, "srv-late")
    assert late.state is State.OPEN
    await relay.wait_counts(2, 1)


async def test_successor_that_cannot_start_leaves_the_old_process_serving() -> None:
    async with relay_with_upgrades("--handover-test=fail-start") as (relay, _):
        b, p, _ = await paired(relay, "srv-fail")
        os.kill(relay.proc.pid, signal.SIGUSR2)
        line = await relay.wait_log(FAILED, timeout=15)
        assert 'reason="successor exited before it was ready"' in line
        await serving_after_failure(relay, b, p)


async def test_successor_that_cannot_read_the_state_leaves_the_old_process_serving() -> None:
    async with relay_with_upgrades("--handover-test=format=999") as (relay, _):
        b, p, _ = await paired(relay, "srv-format")
        await p.send('{"before":1}')
        await recv_json(b)
        os.kill(relay.proc.pid, signal.SIGUSR2)
        line = await relay.wait_log(FAILED, timeout=15)
        assert "successor refused: state format 1, this version reads 999" in line
        await serving_after_failure(relay, b, p)
        assert relay.count_log(COMPLETE) == 0


async def test_successor_that_never_acknowledges_is_killed() -> None:
    async with relay_with_upgrades("--handover-timeout=1s", "--handover-test=no-ack") as (
        relay,
        _,
    ):
        b, p, _ = await paired(relay, "srv-noack")
        os.kill(relay.proc.pid, signal.SIGUSR2)
        line = await relay.wait_log(FAILED, timeout=15)
        assert 'reason="timed out"' in line
        await serving_after_failure(relay, b, p)
        assert relay.count_log(COMPLETE) == 0


async def test_upgrade_command_waits_for_the_outcome() -> None:
    async with relay_with_upgrades() as (relay, upgrades):
        b, p, cid = await paired(relay, "srv-cmd")
        old = relay.proc.pid
        code, out = await run_command(relay_command("upgrade", str(old)))
        match = re.search(r"upgraded: (\d+) handed over to (\d+)", out)
        if match:
            upgrades.pids.append(int(match[2]))
        assert code == 0 and match and int(match[1]) == old, out
        assert await exit_code(relay) == 0
        await p.send('{"n":1}')
        assert await recv_json(b) == {"conn_id": cid, "frame": {"n": 1}}


async def test_upgrade_command_reports_a_failed_handover() -> None:
    async with relay_with_upgrades("--handover-test=format=2") as (relay, _):
        b, p, _ = await paired(relay, "srv-cmd-fail")
        code, out = await run_command(relay_command("upgrade", str(relay.proc.pid)))
        assert code == 1 and "the handover failed" in out, out
        await relay.wait_log(FAILED)
        await serving_after_failure(relay, b, p)


async def test_static_tls_hands_over_listeners_and_drains_its_websockets(
    tmp_path: Path,
) -> None:
    """TLS sessions cannot leave the process: the successor takes the listening socket
    (no refused connection at any moment) and the old process closes its WebSockets 1001,
    as at a restart, then exits 0."""
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN])
    ctx = client_context(ca.pem)
    flags = (f"--tls-cert={cert}", f"--tls-key={key}", HANDOVER)
    async with start_tls_relay(*flags) as relay:
        upgrades = Upgrades(relay)
        try:
            b = await tls_binary(relay.port, ctx, "s-tls")
            p = await tls_phone(relay.port, ctx, "s-tls")
            os.kill(relay.proc.pid, signal.SIGUSR2)
            line = await relay.wait_log(COMPLETE, timeout=15)
            match = re.search(r"pid=(\d+)", line)
            assert match is not None
            upgrades.pids.append(int(match[1]))
            assert "connections=0" in line
            assert await closed_with(b) == (1001, "shutting down")
            assert await closed_with(p) == (1001, "shutting down")
            assert await exit_code(relay) == 0
            assert relay.count_log('msg="handed over listeners; draining"') == 1
            # The successor serves the same port: a binary reconnects, its phone too.
            b2 = await tls_binary(relay.port, ctx, "s-tls")
            p2 = await tls_phone(relay.port, ctx, "s-tls")
            relay.clients += [b2, p2]
            await p2.send('{"n":1}')
            assert (await recv_json(b2))["frame"] == {"n": 1}
        finally:
            await upgrades.kill_all()


async def test_cluster_mode_hands_over_listeners_and_ends_pairs_as_an_orderly_shutdown() -> None:
    """Cluster mode: the successor is a new instance (a random id) on the same sockets; the
    old one drains as at SIGTERM. So, exactly: its WebSockets close 1001 `shutting down`,
    a phone elsewhere whose binary was on it closes 1011 `server owner gone`, and both
    reconnect at once (the ids were handed back)."""
    async with redis_server() as redis:
        cluster = (f"--cluster-redis={redis.url}", "--cluster-lease=2s")
        async with (
            relay_with_upgrades(*cluster) as (r1, upgrades),
            start_relay(*cluster) as r2,
        ):
            ids = [_field(await r.wait_log("msg=starting "), "cluster") for r in (r1, r2)]
            b1 = await binary(r1, "srv-cl")
            await redis.wait_owner("srv-cl", ids[0])
            local = await phone(r1, "srv-cl")
            remote = await phone(r2, "srv-cl")
            for p in (local, remote):
                await p.send('{"hi":1}')
                await recv_json(b1)
            os.kill(r1.proc.pid, signal.SIGUSR2)
            line = await r1.wait_log(COMPLETE, timeout=15)
            match = re.search(r"pid=(\d+)", line)
            assert match is not None
            upgrades.pids.append(int(match[1]))
            codes = await asyncio.gather(*(closed_with(ws) for ws in (b1, local, remote)))
            assert codes == [(1001, "shutting down"), (1001, "shutting down"), OWNER_GONE]
            assert await exit_code(r1) == 0
            # The successor (another instance) serves the same port; the id is free at once.
            again = await binary(r1, "srv-cl")
            p = await phone(r2, "srv-cl")
            await p.send('{"back":1}')
            assert (await recv_json(again))["frame"] == {"back": 1}


async def test_cluster_successor_with_the_same_instance_id_is_refused_and_nothing_ends() -> None:
    async with redis_server() as redis:
        flags = (f"--cluster-redis={redis.url}", "--instance-id=fixed", "--cluster-lease=2s")
        async with relay_with_upgrades(*flags) as (relay, _):
            b, p, _ = await paired(relay, "srv-fixed")
            os.kill(relay.proc.pid, signal.SIGUSR2)
            line = await relay.wait_log(FAILED, timeout=15)
            assert 'reason="successor exited before it was ready"' in line
            assert relay.count_log("instance id already live") == 1
            await p.send('{"after":1}')
            assert (await recv_json(b))["frame"] == {"after": 1}


async def test_systemd_follows_the_successor_as_main_pid(tmp_path: Path) -> None:
    """The old process names the successor (MAINPID=) before it exits and never says
    STOPPING=1; the successor names itself and says READY=1 once it serves."""
    with notify_socket(tmp_path) as (sock, env):
        async with relay_with_upgrades(env=env) as (relay, upgrades):
            assert (await next_notification(sock))["READY"] == "1"
            old = relay.proc.pid
            new = await upgrades.upgrade()
            notes = [await next_notification(sock) for _ in range(3)]
            assert notes[0] == {"MAINPID": str(new)}
            assert notes[1] == {"MAINPID": str(new)}
            assert notes[2]["READY"] == "1" and "STOPPING" not in notes[2]
            assert not _alive(old)


async def test_proxy_protocol_listener_and_rate_limit_buckets_carry_over(tmp_path: Path) -> None:
    """Behind PROXY v2 (static TLS): the successor serves the handed listening socket, and a
    client that spent its upgrade burst before the handover is still limited after it."""
    ca, flags = proxy_relay(tmp_path, HANDOVER)
    ctx = client_context(ca.pem)
    async with start_tls_relay(*flags) as relay:
        upgrades = Upgrades(relay)
        try:
            spent = v4("192.0.2.7")
            assert [await upgrade_status(relay, ctx, spent) for _ in range(2)] == [400, 400]
            os.kill(relay.proc.pid, signal.SIGUSR2)
            line = await relay.wait_log(COMPLETE, timeout=15)
            upgrades.pids.append(int(_field(line, "pid")))
            assert await exit_code(relay) == 0
            assert await upgrade_status(relay, ctx, spent) == 429  # its bucket came along
            assert await upgrade_status(relay, ctx, v4("192.0.2.8")) == 400  # a fresh one
        finally:
            await upgrades.kill_all()


async def test_a_request_head_half_sent_across_the_handover_is_answered() -> None:
    async with relay_with_upgrades() as (relay, upgrades):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        relay.raw_clients.append(writer)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")
        await writer.drain()
        # Most likely read by now (the relay has served another request since); either way,
        # read and carried or still in the kernel, the successor must answer it.
        await relay.wait_counts(0, 0)
        await upgrades.upgrade()
        assert "connections=1" in [x for x in relay.lines if COMPLETE in x][-1]
        writer.write(b"\r\n")
        async with asyncio.timeout(5):
            response = await reader.read()
        assert response.startswith(b"HTTP/1.1 200 ")
        assert b'"status":"ok"' in response


async def test_acme_mode_hands_over_both_listeners_and_the_successor_reuses_the_certificate(
    tmp_path: Path,
) -> None:
    http_port = free_port()
    async with pebble(tmp_path, http_port) as p:
        flags = [*acme_flags(p, tmp_path / "certs", http_port), HANDOVER]
        async with start_tls_relay(*flags, ready="acme certificate obtained") as relay:
            upgrades = Upgrades(relay)
            try:
                serial = serial_in(await relay.wait_log("acme certificate obtained"))
                ctx = ssl.create_default_context(cadata=p.root_pem.decode())
                b = await tls_binary(relay.port, ctx, "s-acme")
                relay.clients.append(b)
                os.kill(relay.proc.pid, signal.SIGUSR2)
                line = await relay.wait_log(COMPLETE, timeout=15)
                upgrades.pids.append(int(_field(line, "pid")))
                assert await closed_with(b) == (1001, "shutting down")
                assert await exit_code(relay) == 0
                # The successor serves both ports: HTTPS with the cached certificate (no
                # new order), and the port-80 listener.
                again = await tls_binary(relay.port, ctx, "s-acme")
                relay.clients.append(again)
                assert serial_of(again) == serial
                assert relay.count_log("acme certificate obtained") == 1
                status, _ = await plain_request(http_port, "/elsewhere", DOMAIN)
                assert status == 404  # (not a challenge: its answer comes from the successor)
            finally:
                await upgrades.kill_all()


# A PID namespace stands in for a container; its processes die with `unshare`.
UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]


def _child_of(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        children = f.read().split()
    assert len(children) == 1, children
    return int(children[0])


def _container_relay(wrap: list[str]) -> tuple[list[str], int, int]:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a PID namespace")
    port, metrics_port = free_port(), free_port()
    argv = relay_command(
        f"--insecure-listen=127.0.0.1:{port}",
        f"--metrics-listen=127.0.0.1:{metrics_port}",
        *FAST_TIMERS,
        HANDOVER,
    )
    return [*wrap, *argv], port, metrics_port


async def test_as_a_containers_first_process_the_relay_stays_behind_as_its_init() -> None:
    """pid 1 runs the relay as its child and follows it to its successor: the handover
    works in a container, and the container ends with the relay that serves last."""
    argv, port, metrics_port = _container_relay(UNSHARE)
    async with launch(argv, port=port, metrics_port=metrics_port) as relay:
        b, p, cid = await paired(relay, "srv-box")
        init = _child_of(relay.proc.pid)  # unshare's child: pid 1 inside
        first = _child_of(init)
        os.kill(init, signal.SIGUSR2)  # as `docker kill --signal USR2` would
        await relay.wait_log(COMPLETE, timeout=15)
        await wait_gone(first)
        assert _alive(init)
        await p.send('{"after":1}')
        assert await recv_json(b) == {"conn_id": cid, "frame": {"after": 1}}
        # SIGTERM to pid 1 reaches the successor: the usual drain, and the container ends 0.
        os.kill(init, signal.SIGTERM)
        assert await closed_with(p) == (1001, "shutting down")
        assert await exit_code(relay) == 0


async def test_under_a_containers_foreign_init_the_handover_is_refused_and_nothing_ends() -> None:
    """A successor would die with the container when the old process exits: the relay is
    what the container's init (here a shell, as tini or docker's --init) started."""
    wrap = [*UNSHARE, "sh", "-c", '"$@"; :', "init"]
    argv, port, metrics_port = _container_relay(wrap)
    async with launch(argv, port=port, metrics_port=metrics_port) as relay:
        b, p, _ = await paired(relay, "srv-box")
        relay_pid = _child_of(_child_of(relay.proc.pid))  # the shell's child
        os.kill(relay_pid, signal.SIGUSR2)
        line = await relay.wait_log(FAILED, timeout=15)
        assert 'reason="the parent is a container\'s init"' in line
        await p.send('{"after":1}')
        assert (await recv_json(b))["frame"] == {"after": 1}
