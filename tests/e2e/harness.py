"""End-to-end harness: the real relay process on loopback, and client fakes.

The relay runs as `python -m pyrycode_relay` with an ephemeral port picked here (the
relay refuses port 0 by design, like the reference) and short timers passed as ordinary
flags. Fakes behave like the real clients (shared/spec/clients.md): the binary sends
`X-Pyrycode-Server`, `X-Pyrycode-Version` and `User-Agent: pyry/<v>`; the phone sends
`X-Pyrycode-Server`, `X-Pyrycode-Token`, `User-Agent` and optionally a device name;
both use text frames, no compression, and answer pings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import websockets
from websockets.asyncio.client import ClientConnection

from pyrycode_relay.tools.bench.ports import free_port

# The relay's command line and environment are the tools' (tools/bench/spawn.py), so a test
# and a bench start the same relay the same way. Re-exported for the tests that run the relay
# themselves (mypy --strict takes `x as x` as an explicit re-export).
from pyrycode_relay.tools.bench.spawn import (
    relay_command as relay_command,  # noqa: PLC0414
)
from pyrycode_relay.tools.bench.spawn import (
    relay_env as relay_env,  # noqa: PLC0414
)

# Timers short enough for tests but long enough not to fire by accident on a slow CI box.
FAST_TIMERS = (
    "--grace-period=600ms",
    "--heartbeat-interval=5s",
    "--heartbeat-timeout=5s",
    "--conflict-probe-timeout=400ms",
    "--message-read-timeout=5s",
    "--write-timeout=2s",
    "--handshake-timeout=2s",
    "--drain-timeout=3s",
)
TOKEN = "secret-device-token-7f3a9c"  # must never appear in the relay's logs


class Relay:
    """One relay process. Use `async with start_relay(...) as relay`."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, metrics_port: int) -> None:
        self.proc = proc
        self.port = port
        self.metrics_port = metrics_port
        self.lines: list[str] = []  # its log (stderr)
        self.stdout_lines: list[str] = []  # nothing, ever: the relay writes only its log
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read_stderr())
        self._stdout_reader = asyncio.create_task(self._read_stdout())
        # Every client a test opened through the harness, closed when the relay stops, so
        # no socket outlives its test (an unclosed one is a ResourceWarning, i.e. an error).
        self.clients: list[ClientConnection] = []
        self.raw_clients: list[asyncio.StreamWriter] = []

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()  # end of output: a waiter learns no line will come

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.stdout_lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        """The first log line containing `needle` (waiting for it if needed). Fails at
        once, with the log, if the relay's output has ended without it."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                if self._reader.done():
                    await self.proc.wait()
                    raise AssertionError(
                        f"the relay exited {self.proc.returncode} before logging {needle!r};"
                        f" its log:\n{self.log}"
                    )
                self._new_line.clear()
                await self._new_line.wait()

    def count_log(self, needle: str) -> int:
        return sum(needle in line for line in self.lines)

    async def http(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, port: int = 0
    ) -> tuple[int, dict[str, str], bytes]:
        return await http_request(port or self.port, method, path, headers)

    async def healthz(self) -> dict[str, Any]:
        status, _, body = await self.http("GET", "/healthz")
        assert status == 200
        result: dict[str, Any] = json.loads(body)
        return result

    async def counts(self) -> tuple[int, int]:
        h = await self.healthz()
        return h["connected_binaries"], h["connected_phones"]

    async def wait_counts(self, binaries: int, phones: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while await self.counts() != (binaries, phones):
                await asyncio.sleep(0.02)

    async def metrics(self) -> dict[str, float]:
        """`/metrics` parsed into {"name{labels}": value}."""
        status, _, body = await self.http("GET", "/metrics", port=self.metrics_port)
        assert status == 200
        series: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                series[name] = float(value)
        return series

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
            await self._stdout_reader
        return code


@contextlib.asynccontextmanager
async def launch(
    argv: Sequence[str],
    *,
    port: int,
    metrics_port: int = 0,
    env: Mapping[str, str] | None = None,
    ready: str = "msg=starting ",
    timeout: float = 10.0,
) -> AsyncIterator[Relay]:
    """Run a relay command line until the block ends: wait for its `ready` log line,
    then kill it, close every client the test opened through the harness, and check
    the output's hygiene (no device token, no internal error, no Python warning, nothing
    on stdout)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=relay_env(env),
    )
    relay = Relay(proc, port, metrics_port)
    try:
        try:
            await relay.wait_log(ready, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"no {ready!r} in {timeout} s; the log:\n{relay.log}") from None
        yield relay
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(Exception):
            await relay._reader
        with contextlib.suppress(Exception):
            await relay._stdout_reader
        for client in relay.clients:
            client.transport.abort()
        for writer in relay.raw_clients:
            writer.transport.abort()
        assert TOKEN not in relay.log, "a device token reached the logs"
        assert "internal error" not in relay.log, relay.log
        # A dependency's warning is fixed at its cause (pytest's filterwarnings = error, for
        # the relay's own process).
        assert "python warning" not in relay.log, relay.log
        assert not relay.stdout_lines, relay.stdout_lines


@contextlib.asynccontextmanager
async def start_relay(
    *flags: str,
    env: Mapping[str, str] | None = None,
    timers: Sequence[str] = FAST_TIMERS,
    metrics: bool = True,
    ready: str = "msg=starting ",
) -> AsyncIterator[Relay]:
    """The relay in insecure mode on a free port, short timers, then `flags`."""
    port = free_port()
    metrics_port = free_port() if metrics else 0
    args = [f"--insecure-listen=127.0.0.1:{port}", "--max-connections=200", *timers]
    args.append(f"--metrics-listen=127.0.0.1:{metrics_port}" if metrics else "--metrics-listen=")
    args.extend(flags)  # later flags win (Go flag semantics)
    argv = relay_command(*args)
    async with launch(argv, port=port, metrics_port=metrics_port, env=env, ready=ready) as r:
        yield r


async def run_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run a command to completion (bounded): (exit code, stdout and stderr together)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=relay_env(env),
    )
    async with asyncio.timeout(10):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


async def run_relay(*flags: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run the relay to completion (for boot refusals): (exit code, its output)."""
    return await run_command(relay_command(*flags), env)


# -- WebSocket fakes ------------------------------------------------------------------


class Dialable(Protocol):
    """Where the fakes connect: a relay, or a load balancer in front of relays. Every
    client opened there is kept in `clients`, closed when the block that started it ends."""

    @property
    def url(self) -> str: ...

    @property
    def clients(self) -> list[ClientConnection]: ...


async def binary(
    relay: Dialable, server_id: str, *, version: str = "0.11.0", **kwargs: Any
) -> ClientConnection:
    """A fake pyry binary on /v1/server."""
    ws = await websockets.connect(
        f"{relay.url}/v1/server",
        additional_headers={"X-Pyrycode-Server": server_id, "X-Pyrycode-Version": version},
        user_agent_header=f"pyry/{version}",
        compression=None,
        max_size=1 << 20,
        **kwargs,
    )
    relay.clients.append(ws)
    return ws


async def phone(
    relay: Dialable, server_id: str, *, device_name: str | None = "Pixel 8", **kwargs: Any
) -> ClientConnection:
    """A fake phone on /v1/client (mobile: bare version as User-Agent)."""
    headers = {"X-Pyrycode-Server": server_id, "X-Pyrycode-Token": TOKEN}
    if device_name is not None:
        headers["X-Pyrycode-Device-Name"] = device_name
    ws = await websockets.connect(
        f"{relay.url}/v1/client",
        additional_headers=headers,
        user_agent_header="1.4.2",
        compression=None,
        max_size=1 << 20,
        **kwargs,
    )
    relay.clients.append(ws)
    return ws


async def recv(ws: ClientConnection, timeout: float = 3.0) -> str | bytes:
    async with asyncio.timeout(timeout):
        return await ws.recv()


async def recv_json(ws: ClientConnection, timeout: float = 3.0) -> Any:
    return json.loads(await recv(ws, timeout))


async def closed_with(ws: ClientConnection, timeout: float = 3.0) -> tuple[int, str]:
    """Wait for the relay to close `ws`; returns (code, reason) it sent. Fails if a data
    message arrives first."""
    async with asyncio.timeout(timeout):
        try:
            msg = await ws.recv()
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None, f"closed without a close frame: {exc!r}"
            return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError(f"expected a close, got a message: {msg!r}")


async def assert_silent(ws: ClientConnection, seconds: float = 0.3) -> None:
    """Nothing arrives on `ws` for `seconds` (and it stays open)."""
    try:
        async with asyncio.timeout(seconds):
            msg = await ws.recv()
    except TimeoutError:
        return
    raise AssertionError(f"unexpected message: {msg!r}")


async def paired(relay: Relay, server_id: str) -> tuple[ClientConnection, ClientConnection, str]:
    """A binary and one phone, with the phone's conn_id learned from a first frame."""
    b = await binary(relay, server_id)
    p = await phone(relay, server_id)
    await p.send('{"hello":1}')
    env = await recv_json(b)
    return b, p, env["conn_id"]


# -- raw HTTP and raw WebSocket ------------------------------------------------------


async def http_request(
    port: int, method: str, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection; the relay closes after answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        parsed[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), parsed, body


def upgrade_headers(endpoint: str, server_id: str) -> dict[str, str]:
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        "X-Pyrycode-Server": server_id,
        "User-Agent": "raw/1",
    }
    if endpoint == "server":
        headers["X-Pyrycode-Version"] = "0.11.0"
    else:
        headers["X-Pyrycode-Token"] = TOKEN
    return headers


class RawWs:
    """A hand-driven WebSocket client for what well-behaved libraries refuse to do:
    never read, dribble a frame, stall mid-fragment."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, relay: Relay, endpoint: str, server_id: str) -> RawWs:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        lines = [f"GET /v1/{endpoint} HTTP/1.1", f"Host: 127.0.0.1:{relay.port}"]
        lines += [f"{k}: {v}" for k, v in upgrade_headers(endpoint, server_id).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        relay.raw_clients.append(writer)
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        self.writer.write(encode_frame(opcode, payload, fin=fin))

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the relay."""
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(length)

    async def read_until_closed(self, timeout: float = 5.0) -> int | None:
        """Reads (answering nothing) until the relay closes; the close code, or None
        if the TCP connection ended without a close frame."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    opcode, payload = await self.read_frame(timeout)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return None
                if opcode == 0x8:
                    return int(struct.unpack("!H", payload[:2])[0]) if payload else 1005

    def close(self) -> None:
        self.writer.close()


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


# -- appended helpers (registry lifecycle / close notice tests) ------------------------


async def wait_metric(relay: Relay, series: str, value: float, timeout: float = 5.0) -> None:
    """Poll `/metrics` until `series` (as parsed by `Relay.metrics`) equals `value`."""
    async with asyncio.timeout(timeout):
        while (await relay.metrics()).get(series) != value:
            await asyncio.sleep(0.02)


async def raw_read_close(raw: RawWs, timeout: float = 5.0) -> tuple[int | None, str, list[bytes]]:
    """Reads from `raw` (answering nothing) until the relay's close frame. Returns
    (code, reason, payloads of the data frames read before it); code is None if TCP ended
    without a close frame, 1005 if the close frame carried no status."""
    data: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                opcode, payload = await raw.read_frame(timeout)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None, "", data
            if opcode == 0x8:
                if not payload:
                    return 1005, "", data
                code = int(struct.unpack("!H", payload[:2])[0])
                return code, payload[2:].decode("utf-8", "replace"), data
            if opcode in (0x0, 0x1, 0x2):
                data.append(payload)
