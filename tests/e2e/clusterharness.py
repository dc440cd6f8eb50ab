"""Cluster end-to-end helpers: a real `redis-server` on loopback and N relay instances.

`redis_server()` runs Debian's redis-server (scripts/test.sh installs it) on a free
loopback port with its own temporary directory, no persistence, and kills it when the
block ends. It can be stopped (SIGTERM, like an operator) and started again on the same
port, which is how the tests simulate an outage. A tiny RESP client lets a test look at
the keys and channels the cluster contract names (ownership, instance liveness, the bus).

`start_cluster()` starts N relay processes through `harness.start_relay` (so every
process gets the same log hygiene checks and is killed at the end), all pointed at the
same Redis, instance ids `i1..iN`, short lease. Relays print `msg=starting ` only once
their bus subscription is active, so the cluster is usable as soon as the block starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from pyrycode_relay.tools.bench.ports import free_port
from tests.e2e.harness import Relay, relay_command, relay_env, start_relay

REDIS_SERVER = shutil.which("redis-server")
OWNER_KEY = "pyrycode-relay:owner:"
INSTANCE_KEY = "pyrycode-relay:instance:"
BUS_CHANNEL = "pyrycode-relay:inst:"

RespValue: TypeAlias = "str | int | bytes | list[RespValue] | None"


class RespError(Exception):
    """Redis answered with an error reply."""


class Redis:
    """One redis-server process on 127.0.0.1:`port` (stoppable and restartable)."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        path = self.workdir / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def start(self, timeout: float = 5.0) -> None:
        """Start (or start again, on the same port) and wait until it answers PING."""
        assert REDIS_SERVER is not None, "redis-server is missing: scripts/test.sh installs it"
        assert not self.running, "redis-server is already running"
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.proc.returncode is not None:
                        raise AssertionError(f"redis-server exited:\n{self.log_tail()}")
                    try:
                        if await self.command("PING") == "PONG":
                            return
                    except OSError:
                        pass
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"redis-server never answered PING:\n{self.log_tail()}") from None

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM and wait for the exit (an orderly outage: clients see their sockets close)."""
        assert self.proc is not None and self.proc.returncode is None, "not running"
        await self.disconnect()
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout):
            await self.proc.wait()

    async def kill(self) -> None:
        await self.disconnect()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    # -- a minimal RESP2 client: one connection, kept (few ephemeral ports in use) --------

    async def command(self, *args: str, timeout: float = 2.0) -> RespValue:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            raw = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        async with self._lock:
            if self._conn is None:
                self._conn = await asyncio.open_connection("127.0.0.1", self.port)
            reader, writer = self._conn
            try:
                writer.write(b"".join(parts))
                async with asyncio.timeout(timeout):
                    return await _read_reply(reader)
            except RespError:
                raise
            except BaseException:
                await self.disconnect()  # a half-read reply: never reuse the connection
                raise

    async def disconnect(self) -> None:
        """Close the client connection (the next command opens a new one)."""
        if self._conn is not None:
            _, writer = self._conn
            self._conn = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def get(self, key: str) -> str | None:
        value = await self.command("GET", key)
        assert value is None or isinstance(value, bytes), value
        return None if value is None else value.decode()

    async def pttl(self, key: str) -> int:
        """Milliseconds left on `key`: -2 when it does not exist, -1 without expiry."""
        value = await self.command("PTTL", key)
        assert isinstance(value, int), value
        return value

    async def owner(self, server_id: str) -> str | None:
        return await self.get(OWNER_KEY + server_id)

    async def instance_live(self, instance_id: str) -> bool:
        return await self.command("EXISTS", INSTANCE_KEY + instance_id) == 1

    async def subscribers(self, instance_id: str) -> int:
        """How many subscriptions Redis holds on the instance's bus channel."""
        reply = await self.command("PUBSUB", "NUMSUB", BUS_CHANNEL + instance_id)
        assert isinstance(reply, list) and len(reply) == 2, reply
        count = reply[1]
        assert isinstance(count, int), reply
        return count

    async def wait_owner(self, server_id: str, instance_id: str, timeout: float = 5.0) -> None:
        """Poll until `pyrycode-relay:owner:<server_id>` names `instance_id`."""
        seen: str | None = None
        try:
            async with asyncio.timeout(timeout):
                while (seen := await self.owner(server_id)) != instance_id:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(
                f"owner of {server_id!r} is {seen!r}, expected {instance_id!r}"
            ) from None

    async def wait_instance_ready(self, instance_id: str, timeout: float = 5.0) -> None:
        """Poll until the instance's liveness key exists and its bus channel has exactly
        one subscription."""
        live, subs = False, 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    live = await self.instance_live(instance_id)
                    subs = await self.subscribers(instance_id)
                    if live and subs == 1:
                        return
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(
                f"instance {instance_id}: key live={live}, bus subscriptions={subs}"
            ) from None


async def _read_reply(reader: asyncio.StreamReader) -> RespValue:
    line = (await reader.readuntil(b"\r\n"))[:-2]
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        return (await reader.readexactly(n + 2))[:-2]
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [await _read_reply(reader) for _ in range(n)]
    raise AssertionError(f"unexpected RESP reply: {line!r}")


@contextlib.asynccontextmanager
async def redis_server(*, started: bool = True) -> AsyncIterator[Redis]:
    """A redis-server on a free loopback port (not yet started if `started` is False),
    always killed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="relay-redis-") as workdir:
        redis = Redis(free_port(), Path(workdir))
        try:
            if started:
                await redis.start()
            yield redis
        finally:
            await redis.kill()


class FreezingProxy:
    """A TCP forwarder on loopback in front of a Redis. `freeze_subscribers()` stops every
    byte of the connections that subscribed, both ways, and keeps their TCP connections
    open: what a NAT or load balancer that silently dropped an idle flow leaves behind."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            link.abort()
        self._links.clear()

    def freeze_subscribers(self) -> int:
        """Freeze every live connection that sent SUBSCRIBE; how many there were."""
        frozen = [link for link in self._links if link.subscriber and not link.frozen]
        for link in frozen:
            link.frozen = True
        return len(frozen)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis.port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.append(link)
        await asyncio.gather(
            link.pump(reader, up_writer, upstream=True),
            link.pump(up_reader, writer, upstream=False),
            return_exceptions=True,
        )
        link.abort()
        if link in self._links:
            self._links.remove(link)


class _Link:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.writers = (client, server)
        self.subscriber = False
        self.frozen = False

    async def pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        while data := await src.read(65536):
            if upstream and b"SUBSCRIBE" in data:
                self.subscriber = True
            if not self.frozen:  # frozen: read and dropped, so nobody's buffers fill
                dst.write(data)
                await dst.drain()
        self.abort()  # one side closed: so does the other

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def freezing_proxy(redis: Redis) -> AsyncIterator[FreezingProxy]:
    proxy = FreezingProxy(redis)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@dataclass
class Cluster:
    redis: Redis
    relays: list[Relay]
    ids: list[str]

    def instance_id(self, relay: Relay) -> str:
        return self.ids[self.relays.index(relay)]

    async def wait_owner(self, server_id: str, relay: Relay, timeout: float = 5.0) -> None:
        """Barrier: `relay` owns `server_id` cluster-wide (its claim reached Redis)."""
        await self.redis.wait_owner(server_id, self.instance_id(relay), timeout)

    async def wait_ready(self, timeout: float = 5.0) -> None:
        """Every instance is live in Redis and subscribed to its bus channel."""
        async with asyncio.timeout(timeout):
            for iid in self.ids:
                await self.redis.wait_instance_ready(iid)


@contextlib.asynccontextmanager
async def start_cluster(
    redis: Redis,
    n: int,
    *flags: str,
    lease: str = "1s",
    prefix: str = "i",
    env: Mapping[str, str] | None = None,
    ready: str = "msg=starting ",
) -> AsyncIterator[Cluster]:
    """`n` relays (started concurrently) on `redis`, instance ids `<prefix>1..<prefix>n`,
    `--cluster-lease=<lease>`, then `flags` (later flags win)."""
    ids = [f"{prefix}{k}" for k in range(1, n + 1)]
    managers = [
        start_relay(
            f"--cluster-redis={redis.url}",
            f"--instance-id={iid}",
            f"--cluster-lease={lease}",
            *flags,
            env=env,
            ready=ready,
        )
        for iid in ids
    ]
    async with contextlib.AsyncExitStack() as stack:
        results = await asyncio.gather(*(m.__aenter__() for m in managers), return_exceptions=True)
        relays: list[Relay] = []
        failure: BaseException | None = None
        for manager, result in zip(managers, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                stack.push_async_exit(manager)
                relays.append(result)
        if failure is not None:
            raise failure
        try:
            yield Cluster(redis, relays, ids)
        except BaseException:
            # pytest shows captured output with the failure: every instance's log
            for iid, relay in zip(ids, relays, strict=True):
                print(f"----- relay {iid} log -----\n{relay.log}")
            raise


def open_fds(relay: Relay) -> int:
    """How many file descriptors the relay process holds right now."""
    return len(os.listdir(f"/proc/{relay.proc.pid}/fd"))


async def run_relay_bounded(*flags: str, timeout: float = 10.0) -> tuple[int | None, str]:
    """Run the relay expecting it to exit by itself (a boot refusal): (exit code, output).
    Unlike `harness.run_relay`, a relay that keeps running is killed at the deadline and
    reported with exit code None, so a missing refusal fails the test without leaking a
    process."""
    proc = await asyncio.create_subprocess_exec(
        *relay_command(*flags),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=relay_env(),
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
        return proc.returncode, out.decode("utf-8", "replace")
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return None, out.decode("utf-8", "replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
