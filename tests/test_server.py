"""RelayServer in-process: however start-up ends, everything it started is undone.

The end-to-end suites cover serving and draining through real processes; here the server runs
on the test's own event loop, so what it leaves behind (tasks, signal handlers, an open push
sender) can be seen directly."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from pyrycode_relay.core.config import parse_args
from pyrycode_relay.ops import fcm
from pyrycode_relay.ops.boot import check_boot
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.refusal import ExitCode
from pyrycode_relay.server import RelayServer
from pyrycode_relay.tools.bench.ports import free_port
from tests.e2e.fake_google import service_account
from tests.e2e.harness import upgrade_headers


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def run(*flags: str, fcm: str | None = None) -> tuple[ExitCode, list[dict[str, Any]]]:
    """The server on this loop, JSON logs parsed; the loop gets its exception handler back."""
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    out = io.StringIO()
    config = parse_args([*flags, "--metrics-listen="], {})
    listeners = check_boot(config, {}, euid=0, proc_status=None, platform="linux")
    try:
        code = await RelayServer(config, listeners, Logger(out, "json"), "test", fcm).run()
    finally:
        loop.set_exception_handler(handler)
    return code, lines(out)


def no_handler_left() -> bool:
    loop = asyncio.get_running_loop()
    return not any(
        loop.remove_signal_handler(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    )


def only_this_task() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


class RecordingSender:
    """Stands in for the FCM client: the server must close whatever push sender it built."""

    def __init__(self) -> None:
        self.closed = False

    async def send(self, token: str) -> object:
        raise AssertionError("nothing is sent in these tests")

    async def aclose(self) -> None:
        self.closed = True


async def test_a_refusal_after_the_push_sender_undoes_everything_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = RecordingSender()
    monkeypatch.setattr(fcm, "build_sender", lambda credentials, endpoint: sender)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    fcm_key = service_account("https://127.0.0.1:1/token")
    flags = (f"--https-listen=127.0.0.1:{free_port()}", f"--tls-cert={cert}", f"--tls-key={key}")
    code, logged = await run(*flags, fcm=fcm_key)
    assert code == ExitCode.CONFIG
    assert [r["msg"] for r in logged] == ["refusing to start: invalid TLS certificate"]
    assert sender.closed
    assert no_handler_left() and only_this_task()


async def test_a_listener_that_cannot_open_exits_1_and_undoes_the_rest() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, logged = await run(f"--insecure-listen=127.0.0.1:{port}")
    assert code == ExitCode.RUNTIME
    assert [(r["msg"], r.get("addr")) for r in logged] == [
        ("listener failed", f"127.0.0.1:{port}"),
        ("listener error; draining", None),
    ]
    assert no_handler_left() and only_this_task()


async def test_signals_during_the_drain_are_ours_and_never_fatal() -> None:
    port = free_port()
    server = asyncio.create_task(run(f"--insecure-listen=127.0.0.1:{port}", "--drain-timeout=1s"))
    async with asyncio.timeout(5):
        while True:  # serving once the port answers
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.01)
    # A binary that will never answer the close: the drain waits for it until its deadline.
    head = "".join(f"{k}: {v}\r\n" for k, v in upgrade_headers("server", "s1").items())
    writer.write(f"GET /v1/server HTTP/1.1\r\nHost: relay\r\n{head}\r\n".encode())
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        signal.raise_signal(signal.SIGHUP)  # serving: logged, not fatal
        signal.raise_signal(signal.SIGTERM)
        assert (await reader.readexactly(2))[0] == 0x88  # the drain's close frame: draining
    signal.raise_signal(signal.SIGTERM)  # a second one, during the drain: ignored
    signal.raise_signal(signal.SIGHUP)
    code, logged = await asyncio.wait_for(server, 5)
    writer.close()
    assert code == ExitCode.OK
    msgs = [r["msg"] for r in logged]
    assert msgs.count("shutdown signal received; draining") == 1
    assert msgs.count("reload signal received; nothing to reload") == 2
    assert msgs[-1] == "drain incomplete"
    assert no_handler_left() and only_this_task()
