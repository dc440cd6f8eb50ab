"""`pyrycode-relay probe URL` (README §2) run as a real process against real servers:
the relay over ws:// and over wss:// (through a TLS-terminating proxy, the usual production
shape), and the failure cases: nothing listening, a non-relay HTTP server, an untrusted
certificate, a WebSocket server that is not a relay, bad usage."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import trustme
from websockets.asyncio.server import ServerConnection, serve

from pyrycode_relay import __version__
from pyrycode_relay.tools.bench.ports import free_port
from tests.e2e.harness import relay_command, run_command, start_relay

STEPS = (
    "binary connect",
    "phone connect",
    "phone -> binary",
    "binary -> phone",
    "unknown id -> 4404",
    "close notice",
    "/healthz",
)


async def probe(*args: str) -> tuple[int, str]:
    return await run_command(relay_command("probe", *args))


def assert_report(out: str, url: str) -> str:
    """The report's shape; returns the server-id the probe used."""
    lines = out.strip().splitlines()
    m = re.fullmatch(rf"probe {re.escape(url)} server-id=([0-9a-f-]{{36}})", lines[0])
    assert m is not None, out
    for step, line in zip(STEPS, lines[1:], strict=False):
        assert re.fullmatch(rf"  {re.escape(step)} +[0-9]+\.[0-9]{{2}} ms", line), out
    assert lines[-2:] == [f"  relay version {__version__}", "ok"], out
    return m.group(1)


def assert_one_line_failure(out: str, reason: str) -> None:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("probe failed: ") and reason in lines[0], out


async def test_probe_passes_against_the_relay_and_is_seen_by_it() -> None:
    async with start_relay() as relay:
        code, out = await probe(relay.url)
        assert code == 0, out
        server_id = assert_report(out, relay.url)
        # The relay saw exactly what the report claims: a claim, a phone, a 4404 and the
        # binary leaving, on the probe's own random server-id.
        await relay.wait_log(f"msg=server_released server_id={server_id}")
        assert relay.count_log(f"msg=server_claimed server_id={server_id} ") == 1
        assert relay.count_log(f"msg=phone_registered server_id={server_id} ") == 1
        assert relay.count_log("msg=phone_register_no_server ") == 1
        series = await relay.metrics()
        up = "pyrycode_relay_ws_upgrade_attempts_total"
        assert series[f'{up}{{endpoint="server",outcome="accept"}}'] == 1
        assert series[f'{up}{{endpoint="client",outcome="accept"}}'] == 1
        assert series[f'{up}{{endpoint="client",outcome="reject_404"}}'] == 1
        direction = "pyrycode_relay_frames_forwarded_total{direction="
        assert series[direction + '"phone_to_binary"}'] == 1
        assert series[direction + '"binary_to_phone"}'] == 1


async def test_probe_fails_when_nothing_listens() -> None:
    code, out = await probe(f"ws://127.0.0.1:{free_port()}")
    assert code == 1
    assert_one_line_failure(out, "binary upgrade: cannot connect (ConnectionRefusedError")


@contextlib.asynccontextmanager
async def http_404_server() -> AsyncIterator[int]:
    """Any HTTP server that is not a relay: 404 for every request."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_probe_fails_against_a_plain_http_server() -> None:
    async with http_404_server() as port:
        code, out = await probe(f"ws://127.0.0.1:{port}")
    assert code == 1
    assert_one_line_failure(out, "binary upgrade: HTTP 404 instead of 101")


async def test_probe_fails_against_a_websocket_server_that_does_not_route() -> None:
    # An echo server upgrades both endpoints, but the phone's frame never reaches the
    # "binary": the probe must name the step and give up within its --timeout.
    async def echo(ws: ServerConnection) -> None:
        async for msg in ws:
            await ws.send(msg)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        code, out = await probe(f"ws://127.0.0.1:{port}", "--timeout=300ms")
    assert code == 1
    assert_one_line_failure(out, "phone -> binary: no answer within 0.3s")


@contextlib.asynccontextmanager
async def tls_proxy(ca: trustme.CA, upstream_port: int) -> AsyncIterator[int]:
    """A TLS-terminating TCP proxy in front of the relay (like nginx or Fly's edge)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        for t in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.create_task(t)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]
        for task in list(tasks):
            task.cancel()


async def test_probe_over_wss_with_ca_bundle(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    async with start_relay() as relay, tls_proxy(ca, relay.port) as port:
        url = f"wss://127.0.0.1:{port}"
        code, out = await probe(url, f"--ca-bundle={bundle}")
        assert code == 0, out
        assert_report(out, url)
        # Without the bundle the system store does not trust the test CA.
        code, out = await probe(url)
        assert code == 1
        assert_one_line_failure(out, "binary upgrade: TLS certificate not trusted")


async def test_probe_bad_usage_exits_2(tmp_path: Path) -> None:
    for args, reason in (
        (["ftp://127.0.0.1:1"], "URL must start with ws://"),
        (["ws://127.0.0.1:1", "--ca-bundle=/nonexistent"], "--ca-bundle applies to wss"),
        (["wss://127.0.0.1:1", f"--ca-bundle={tmp_path / 'missing.pem'}"], "cannot load"),
        (["ws://127.0.0.1:1/v1/server"], "base URL"),
        (["ws://127.0.0.1:1", "--timeout=soon"], "--timeout is not a duration"),
        ([], "the following arguments are required: url"),
    ):
        code, out = await probe(*args)
        assert code == 2, (args, out)
        assert reason in out, (args, out)
