"""`pyrycode-relay probe URL` (README §2) run as a real process against real servers:
the relay over ws:// and over wss:// (through a TLS-terminating proxy, the usual production
shape, and a static-TLS relay with --domain reached by address with --connect-to), the
`--json` schema, the continuous mode (`--interval`, its metrics, SIGTERM/SIGINT), and the
failure cases: nothing listening, a relay stopped mid-way, a non-relay HTTP server, an
untrusted certificate, a WebSocket server that is not a relay, bad usage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trustme
from websockets.asyncio.server import ServerConnection, serve

from pyrycode_relay import __version__
from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.spawn import Child, listening, spawned_async
from tests.certs import make_ca, write_leaf
from tests.e2e.harness import http_request, relay_command, relay_env, run_command, start_relay
from tests.e2e.tlsharness import start_tls_relay

STEPS = (
    "binary connect",
    "phone connect",
    "phone -> binary",
    "binary -> phone",
    "unknown id -> 4404",
    "close notice",
    "/healthz",
)
STEP_IDS = (
    "binary_connect",
    "phone_connect",
    "phone_to_binary",
    "binary_to_phone",
    "unknown_server_id",
    "close_notice",
    "healthz",
)
RUN_KEYS = {
    "schema",
    "time",
    "url",
    "connect_to",
    "server_id",
    "ok",
    "error",
    "duration_ms",
    "relay_version",
    "steps",
}


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


# -- --json -------------------------------------------------------------------------------


def assert_run(doc: dict[str, Any], url: str, *, ok: bool) -> None:
    """One `--json` object: the documented keys and types (docs/operations.md)."""
    assert set(doc) == RUN_KEYS, doc
    assert doc["schema"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"]), doc
    assert doc["url"] == url
    assert re.fullmatch(r"[0-9a-f-]{36}", doc["server_id"]), doc
    assert doc["ok"] is ok
    assert isinstance(doc["duration_ms"], float) and doc["duration_ms"] >= 0
    names = [step["name"] for step in doc["steps"]]
    assert names == list(STEP_IDS[: len(names)]), doc  # in order, none skipped
    for step in doc["steps"]:
        assert set(step) == {"name", "ok", "latency_ms", "error"}, step
        assert isinstance(step["latency_ms"], float) and step["latency_ms"] >= 0
    if ok:
        assert doc["error"] is None
        assert doc["relay_version"] == __version__
        assert names == list(STEP_IDS)
        assert all(step["ok"] and step["error"] is None for step in doc["steps"]), doc
    else:
        # The run stops at the first failed step, which carries the run's reason.
        *passed, failed = doc["steps"]
        assert all(step["ok"] and step["error"] is None for step in passed), doc
        assert failed["ok"] is False and failed["error"] == doc["error"], doc
        assert isinstance(doc["error"], str) and doc["error"], doc


async def test_json_reports_every_step_of_a_run_that_passes() -> None:
    async with start_relay() as relay:
        code, out = await probe(relay.url, "--json")
        assert code == 0, out
        lines = out.splitlines()
        assert len(lines) == 1, out  # one object, nothing else on stdout or stderr
        doc = json.loads(lines[0])
        assert_run(doc, relay.url, ok=True)
        assert doc["connect_to"] is None
        await relay.wait_log(f"msg=server_released server_id={doc['server_id']}")


async def test_json_reports_the_failed_step_and_exits_1() -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    code, out = await probe(url, "--json")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 1, out
    doc = json.loads(lines[0])
    assert_run(doc, url, ok=False)
    assert [step["name"] for step in doc["steps"]] == ["binary_connect"]
    assert doc["error"].startswith("binary upgrade: cannot connect (ConnectionRefusedError")
    assert doc["relay_version"] is None


# -- --interval and its metrics -------------------------------------------------------------


@contextlib.asynccontextmanager
async def continuous_probe(url: str, *flags: str) -> AsyncIterator[tuple[Child, int]]:
    """`probe URL --json --interval ... --metrics-listen 127.0.0.1:<port>` until the block
    ends; ready once its metrics listener accepts connections."""
    metrics_port = free_port()
    argv = relay_command(
        "probe", url, "--json", f"--metrics-listen=127.0.0.1:{metrics_port}", *flags
    )
    async with spawned_async(
        argv,
        name="probe",
        env=relay_env(),
        ready=lambda: listening(metrics_port),
        what="serve its metrics",
        timeout=10,
        grace=5,
    ) as child:
        yield child, metrics_port


async def scrape(port: int) -> dict[str, float]:
    """The probe's /metrics parsed into {"name{labels}": value}."""
    status, _, body = await http_request(port, "GET", "/metrics")
    assert status == 200
    series: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


async def wait_metrics(
    port: int, cond: Callable[[dict[str, float]], bool], timeout: float = 10.0
) -> dict[str, float]:
    """The first scrape for which `cond` holds, polling until `timeout`."""
    async with asyncio.timeout(timeout):
        while True:
            series = await scrape(port)
            if cond(series):
                return series
            await asyncio.sleep(0.05)


def json_runs(child: Child) -> list[dict[str, Any]]:
    """Every run the probe has reported; its output must be nothing but JSON lines."""
    return [json.loads(line) for line in child.log_text().splitlines()]


def runs(result: str) -> str:
    return f'pyrycode_relay_probe_runs_total{{result="{result}"}}'


def step_runs(step: str, result: str) -> str:
    return f'pyrycode_relay_probe_step_runs_total{{result="{result}",step="{step}"}}'


async def stop_probe(child: Child) -> int:
    await child.stop_async(grace=5)  # SIGTERM, SIGKILL only after 5 s
    code = child.proc.returncode
    assert code is not None
    return code


async def test_interval_exports_metrics_keeps_going_after_a_failure_and_sigterm_exits_0() -> None:
    start = time.time()
    # The relay's rate limiter would answer 429 to three upgrades every 200 ms.
    async with start_relay("--rate-limit-burst=0") as relay:
        url = relay.url
        async with continuous_probe(url, "--interval=200ms", "--timeout=2s") as (child, port):
            series = await wait_metrics(port, lambda s: s[runs("ok")] >= 2)
            for step in STEP_IDS:
                assert series[step_runs(step, "ok")] >= 2, step
                assert series[step_runs(step, "fail")] == 0, step
                count = f'pyrycode_relay_probe_step_duration_seconds_count{{step="{step}"}}'
                assert series[count] >= 2, step
                inf = (
                    f'pyrycode_relay_probe_step_duration_seconds_bucket{{le="+Inf",step="{step}"}}'
                )
                assert series[inf] == series[count]
                assert series[f'pyrycode_relay_probe_step_success{{step="{step}"}}'] == 1
            assert series["pyrycode_relay_probe_success"] == 1
            assert series["pyrycode_relay_probe_last_run_timestamp_seconds"] >= start
            assert not [name for name in series if "_created" in name]

            # The relay goes away: the runs fail at the first step, and the probe goes on.
            assert await relay.stop() == 0
            failed_before = series[runs("fail")]
            series = await wait_metrics(port, lambda s: s[step_runs("binary_connect", "fail")] >= 2)
            assert series[runs("fail")] > failed_before
            assert series['pyrycode_relay_probe_step_success{step="binary_connect"}'] == 0
            assert series['pyrycode_relay_probe_step_success{step="healthz"}'] == 0
            assert series["pyrycode_relay_probe_success"] == 0

            assert await stop_probe(child) == 0
            reported = json_runs(child)
    assert len(reported) >= 4
    for doc in reported:
        assert_run(doc, url, ok=doc["ok"])
    assert reported[0]["ok"] and reported[1]["ok"]
    assert not reported[-1]["ok"]
    assert reported[-1]["steps"][-1]["name"] == "binary_connect"
    assert "cannot connect (ConnectionRefusedError" in reported[-1]["error"]
    assert len({doc["server_id"] for doc in reported}) == len(reported)  # fresh id per run


async def test_sigint_while_waiting_for_the_next_run_exits_0() -> None:
    # The first run fails; the probe then waits an hour for the next one, until SIGINT.
    url = f"ws://127.0.0.1:{free_port()}"
    async with continuous_probe(url, "--interval=1h") as (child, port):
        await wait_metrics(port, lambda s: s[runs("fail")] == 1)
        child.proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(5):
            while child.proc.poll() is None:
                await asyncio.sleep(0.05)
        assert child.proc.returncode == 0
        [doc] = json_runs(child)
        assert_run(doc, url, ok=False)


async def test_sigterm_during_a_run_ends_it_and_exits_0() -> None:
    # An echo server never routes the phone's frame, so the run waits out its 30 s step
    # timeout, unless SIGTERM ends it first (its connections closed, the run not reported).
    async def echo(ws: ServerConnection) -> None:
        async for msg in ws:
            await ws.send(msg)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}"
        async with continuous_probe(url, "--interval=1s", "--timeout=30s") as (child, _):
            async with asyncio.timeout(5):  # both WebSockets of the run are up
                while len(server.connections) < 2:
                    await asyncio.sleep(0.02)
            began = time.monotonic()
            assert await stop_probe(child) == 0
            assert time.monotonic() - began < 4
            assert json_runs(child) == []
            async with asyncio.timeout(5):
                while server.connections:
                    await asyncio.sleep(0.02)


# -- --connect-to ---------------------------------------------------------------------------


async def test_connect_to_reaches_a_relay_with_domain_by_address(tmp_path: Path) -> None:
    # A name nothing resolves: only --connect-to can reach it, and the relay serves only a
    # handshake and Host for that name.
    name = "relay.probe.test"
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [name])
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.pem)
    flags = (f"--tls-cert={cert}", f"--tls-key={key}", f"--domain={name}")
    async with start_tls_relay(*flags) as relay:
        address = f"127.0.0.1:{relay.port}"
        # By address, the probe sends no SNI: the relay refuses the handshake, and the
        # reason says what to do.
        code, out = await probe(f"wss://{address}", f"--ca-bundle={bundle}")
        assert code == 1
        assert_one_line_failure(out, "binary upgrade: ")
        assert "--connect-to" in out, out

        url = f"wss://{name}"  # port 443 in the URL (and Host), the relay's port dialled
        code, out = await probe(url, f"--connect-to={address}", f"--ca-bundle={bundle}")
        assert code == 0, out
        lines = out.strip().splitlines()
        assert lines[0].endswith(f" connect-to={address}"), out
        server_id = assert_report(out.replace(f" connect-to={address}", ""), url)
        await relay.wait_log(f"msg=server_released server_id={server_id}")
        assert relay.count_log(f"msg=phone_registered server_id={server_id} ") == 1

        code, out = await probe(url, "--json", f"--connect-to={address}", f"--ca-bundle={bundle}")
        assert code == 0, out
        doc = json.loads(out)
        assert_run(doc, url, ok=True)
        assert doc["connect_to"] == address


# -- usage ------------------------------------------------------------------------------------


async def run_split(*args: str) -> tuple[int, str, str]:
    """The probe to completion (bounded): (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *relay_command("probe", *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=relay_env(),
    )
    async with asyncio.timeout(10):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_help_goes_to_stdout_and_exits_0() -> None:
    code, out, err = await run_split("--help")
    assert (code, err) == (0, "")
    for flag in ("--json", "--interval", "--metrics-listen", "--connect-to", "--timeout"):
        assert flag in out, flag


async def test_bad_usage_exits_2_with_one_line(tmp_path: Path) -> None:
    url = "ws://127.0.0.1:1"
    for args, reason in (
        (["ftp://127.0.0.1:1"], "URL must start with ws://"),
        ([url, "--ca-bundle=/nonexistent"], "--ca-bundle applies to wss"),
        (["wss://127.0.0.1:1", f"--ca-bundle={tmp_path / 'missing.pem'}"], "cannot load"),
        (["ws://127.0.0.1:1/v1/server"], "base URL"),
        (["ws://127.0.0.1:99999"], "URL has a bad port"),
        ([url, "--timeout=soon"], "--timeout is not a duration"),
        ([], "the following arguments are required: url"),
        ([url, "--metrics-listen=0.0.0.0:9110", "--interval=30s"], "loopback IP literal"),
        ([url, "--metrics-listen=localhost:9110", "--interval=30s"], "loopback IP literal"),
        ([url, "--metrics-listen=127.0.0.1", "--interval=30s"], "loopback IP literal"),
        ([url, "--metrics-listen=127.0.0.1:9110"], "--metrics-listen needs --interval"),
        ([url, "--interval=0s"], "--interval must be > 0"),
        ([url, "--interval=often"], "--interval is not a duration"),
        ([url, "--connect-to=127.0.0.1"], "--connect-to must be HOST:PORT"),
        ([url, "--connect-to=:443"], "--connect-to must be HOST:PORT"),
        ([url, "--connect-to=127.0.0.1:0"], "--connect-to must be HOST:PORT"),
        ([url, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ):
        code, out, err = await run_split(*args)
        assert (code, out) == (2, ""), (args, out, err)
        lines = err.splitlines()
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith("pyrycode-relay probe: "), (args, err)
        assert reason in lines[0] and lines[0].endswith("; see --help"), (args, err)


async def test_metrics_listen_already_taken_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await run_split(
            "ws://127.0.0.1:1", "--interval=1s", f"--metrics-listen=127.0.0.1:{port}"
        )
    assert (code, out) == (1, ""), err
    assert err.splitlines() == [
        f"pyrycode-relay probe: cannot listen on --metrics-listen 127.0.0.1:{port}: "
        "Address already in use"
    ]
