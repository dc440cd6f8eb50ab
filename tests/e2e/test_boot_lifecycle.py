"""Conformance §15 I: boot configuration, refusals, shutdown and listener lifecycle, logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from pyrycode_relay import __version__
from pyrycode_relay.tools.bench.ports import free_port
from tests.e2e.harness import (
    FAST_TIMERS,
    TOKEN,
    RawWs,
    Relay,
    assert_silent,
    binary,
    closed_with,
    http_request,
    launch,
    paired,
    phone,
    raw_read_close,
    recv_json,
    relay_command,
    run_command,
    run_relay,
    start_relay,
    upgrade_headers,
)

DRAIN = 3.0  # --drain-timeout in FAST_TIMERS


def insecure() -> str:
    return f"--insecure-listen=127.0.0.1:{free_port()}"


def refusal_line(out: str, needle: str) -> str:
    lines = [line for line in out.splitlines() if needle in line]
    assert len(lines) == 1, out
    return lines[0]


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state on sockets that process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# -- flags and refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags", [["--version"], ["-version"], ["--version", "--max-connections=0"]]
)
async def test_version(flags: list[str]) -> None:  # I71
    code, out = await run_relay(*flags, env={"PYRYCODE_RELAY_PRODUCTION": "true"})
    assert (code, out) == (0, __version__ + "\n")


async def test_no_mode_exit_2() -> None:  # I72
    code, out = await run_relay("--metrics-listen=")
    assert code == 2
    refusal_line(
        out,
        'msg="either --domain (for autocert) or --insecure-listen (for behind-proxy mode) '
        'must be set"',
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["--http-listen=:80"],
        ["--http-listen", ":8080"],
        ["--https-listen=:443"],
        ["--https-listen", ":8443"],
        ["--http-listen=:80", "--https-listen=:443"],
        ["--https-proxy-protocol"],
        ["--https-proxy-protocol=false"],
    ],
)
async def test_insecure_listen_exclusive_with_tls_flags(extra: list[str]) -> None:  # I73
    code, out = await run_relay(insecure(), *extra)
    assert code == 2
    refusal_line(out, "refusing to start: --insecure-listen is mutually exclusive with")
    assert "msg=starting" not in out


@pytest.mark.parametrize("value", [["--max-connections=0"], ["--max-connections", "-1"]])
async def test_max_connections_must_be_positive(value: list[str]) -> None:  # I74
    code, out = await run_relay(insecure(), *value)
    assert code == 2
    refusal_line(out, 'msg="refusing to start: invalid --max-connections"')


@pytest.mark.parametrize("var", ["PYRYCODE_RELAY_PRODUCTION", "PYRYCODE_RELAY_SINGLE_INSTANCE"])
@pytest.mark.parametrize("value", ["", "true", "0", " 1", "1 ", "yes-envmarker-93b1"])
async def test_env_flags_must_be_exactly_1(var: str, value: str) -> None:  # I75
    code, out = await run_relay(insecure(), env={var: value})
    assert code == 2
    line = refusal_line(out, 'msg="refusing to start: invalid env-var config"')
    assert f"env_var={var}" in line
    assert "value=" not in line  # names only, never the value
    assert "envmarker" not in out and "true" not in out


async def test_env_flags_accept_1() -> None:  # I75
    # PRODUCTION=1 passes validation (then production rules refuse insecure mode, I77)
    code, out = await run_relay(insecure(), env={"PYRYCODE_RELAY_PRODUCTION": "1"})
    assert code == 2
    assert "invalid env-var config" not in out
    refusal_line(out, 'msg="refusing to start: production-mode misconfiguration"')
    async with start_relay(env={"PYRYCODE_RELAY_SINGLE_INSTANCE": "1"}) as relay:
        await binary(relay, "s1")
        await relay.wait_counts(1, 0)


async def test_fly_app_name_needs_single_instance_bypass() -> None:  # I76
    fly = {"FLY_APP_NAME": "fly-app-marker-5e2"}
    code, out = await run_relay(insecure(), env=fly)
    assert code == 2
    line = refusal_line(out, 'msg="refusing to start: multi-instance deploy detected"')
    assert "bypass_env_var=PYRYCODE_RELAY_SINGLE_INSTANCE" in line
    assert "fly-app-marker" not in out
    async with start_relay(env={**fly, "PYRYCODE_RELAY_SINGLE_INSTANCE": "1"}) as relay:
        b, p, _ = await paired(relay, "s1")
        await relay.wait_counts(1, 1)
        await asyncio.gather(assert_silent(b, 0.05), assert_silent(p, 0.05))
        assert "fly-app-marker" not in relay.log
    async with start_relay(env={"FLY_APP_NAME": ""}) as relay:  # empty: not a Fly deploy
        await relay.wait_counts(0, 0)


async def test_production_refuses_insecure_listen() -> None:  # I77
    code, out = await run_relay(insecure(), env={"PYRYCODE_RELAY_PRODUCTION": "1"})
    assert code == 2
    line = refusal_line(out, 'msg="refusing to start: production-mode misconfiguration"')
    assert "--insecure-listen is set with PYRYCODE_RELAY_PRODUCTION=1" in line
    assert "env_var=PYRYCODE_RELAY_PRODUCTION" in line


def setpriv(*options: str) -> list[str]:
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *options]


# CI runs as root with util-linux's setpriv; there these tests must run, never skip.
needs_setpriv = pytest.mark.skipif(
    not os.environ.get("CI") and (os.geteuid() != 0 or shutil.which("setpriv") is None),
    reason="needs root and setpriv (always run in CI)",
)


@needs_setpriv
async def test_production_root_matrix() -> None:  # I78
    prod = {"PYRYCODE_RELAY_PRODUCTION": "1"}
    tls_mode = ("--domain=relay.example.test", "--metrics-listen=")
    # uid 0 in production → refused, naming the uid
    code, out = await run_relay(*tls_mode, env=prod)
    assert code == 2
    line = refusal_line(out, 'msg="refusing to start: production-mode misconfiguration"')
    assert "effective_uid=0" in line
    # uid 65534 in production passes that check (it then cannot create the default cert
    # cache under root's home: exit 1, a later boot step)
    code, out = await run_command(setpriv("--inh-caps=-all") + relay_command(*tls_mode), prod)
    assert code == 1, out
    assert "refusing to start: cert cache" in out
    assert "production-mode" not in out and "effective_uid" not in out
    # uid 0 outside production mode serves (every other test relies on it too)
    async with start_relay() as relay:
        await relay.wait_counts(0, 0)


@needs_setpriv
async def test_capability_allowlist() -> None:  # I79
    port = free_port()
    flags = (f"--insecure-listen=127.0.0.1:{port}", "--metrics-listen=")
    extra = ("--inh-caps=+net_admin,+net_raw", "--ambient-caps=+net_admin,+net_raw")
    code, out = await run_command(setpriv(*extra) + relay_command(*flags))
    assert code == 2
    line = refusal_line(out, 'msg="refusing to start: unexpected Linux capabilities"')
    assert "cap_net_admin" in line and "cap_net_raw" in line
    # CAP_NET_BIND_SERVICE alone is allowed
    only_bind = ("--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service")
    async with launch(setpriv(*only_bind) + relay_command(*flags), port=port) as relay:
        status, _, _ = await http_request(port, "GET", "/healthz")
        assert status == 200
        assert await relay.stop() == 0


@pytest.mark.parametrize(
    "addr",
    ["0.0.0.0:9090", "localhost:9090", "127.0.0.1:0", "192.0.2.1:9090", "[::]:9090", "nonsense"],
)
async def test_metrics_listen_must_be_loopback_literal(addr: str) -> None:  # I80
    code, out = await run_relay(insecure(), f"--metrics-listen={addr}")
    assert code == 2
    refusal_line(out, 'msg="refusing to start: invalid --metrics-listen address"')


async def test_metrics_listen_empty_disables() -> None:  # I80
    async with start_relay(metrics=False) as relay:
        await relay.wait_counts(0, 0)
        assert relay.count_log("starting metrics listener") == 0
        assert listening_ports(relay.proc.pid) == {relay.port}
    async with start_relay() as relay:  # contrast: enabled means a second listener
        await relay.wait_log(f'msg="starting metrics listener" addr=127.0.0.1:{relay.metrics_port}')
        assert listening_ports(relay.proc.pid) == {relay.port, relay.metrics_port}


@pytest.mark.parametrize("addr", [":0", "127.0.0.1:0", "nonsense", "127.0.0.1:99999", "[::1"])
async def test_insecure_listen_must_be_a_real_address(addr: str) -> None:  # I81
    code, out = await run_relay(f"--insecure-listen={addr}", "--metrics-listen=")
    assert code == 2
    refusal_line(out, 'msg="refusing to start: invalid listener address"')


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--grace-period", "soon"),
        ("--heartbeat-interval", "0s"),
        ("--message-read-timeout", "-1s"),
        ("--max-message-bytes", "1XB"),
        ("--max-connections", "ten"),
        ("--max-phones-per-server", "0"),
        ("--rate-limit-burst", "-1"),
        ("--trust-x-forwarded-for", "maybe"),
        ("--log-format", "xml"),
    ],
)
async def test_invalid_flag_value_one_line(flag: str, value: str) -> None:  # I71-81 (README §2)
    code, out = await run_relay(insecure(), f"{flag}={value}")
    assert code == 2
    lines = out.strip("\n").split("\n")
    assert len(lines) == 1, out
    assert flag in lines[0]


async def test_invalid_env_flag_value_withheld() -> None:  # I71-81 (README §2), I87
    env = {"PYRYCODE_RELAY_GRACE_PERIOD": "soon-envmarker-77"}
    code, out = await run_relay(insecure(), env=env)
    assert code == 2
    lines = out.strip("\n").split("\n")
    assert len(lines) == 1, out
    assert "--grace-period" in lines[0] and "PYRYCODE_RELAY_GRACE_PERIOD" in lines[0]
    assert "envmarker" not in out


async def test_unknown_flag_exit_2() -> None:  # I71-81: unknown flag → exit 2 (§9.3 step 1)
    code, out = await run_relay(insecure(), "--no-such-flag=1")
    assert code == 2
    assert "flag provided but not defined: --no-such-flag" in out


async def test_env_fallback_and_command_line_wins() -> None:  # I71-81 (README §2)
    env = {"PYRYCODE_RELAY_MAX_PHONES_PER_SERVER": "1"}
    async with start_relay(env=env) as relay:
        await binary(relay, "s1")
        p1 = await phone(relay, "s1")
        p2 = await phone(relay, "s1")
        assert await closed_with(p2) == (4429, "too many phones for server-id")
        await assert_silent(p1, 0.05)
    async with start_relay("--max-phones-per-server=2", env=env) as relay:
        await binary(relay, "s1")
        p1 = await phone(relay, "s1")
        p2 = await phone(relay, "s1")
        p3 = await phone(relay, "s1")
        assert (await closed_with(p3))[0] == 4429
        await asyncio.gather(assert_silent(p1, 0.05), assert_silent(p2, 0.05))
        await relay.wait_counts(1, 2)


# -- shutdown and listener lifecycle -----------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_live_connections_1001(sig: int) -> None:  # I84
    async with start_relay() as relay:
        b, p, _ = await paired(relay, "s1")
        b2 = await binary(relay, "s2")
        await relay.wait_counts(2, 1)
        t0 = time.monotonic()
        relay.proc.send_signal(sig)
        closes = await asyncio.gather(closed_with(b), closed_with(p), closed_with(b2))
        assert list(closes) == [(1001, "shutting down")] * 3  # and no close notice before it
        async with asyncio.timeout(DRAIN + 2):
            code = await relay.proc.wait()
        assert code == 0
        assert time.monotonic() - t0 <= DRAIN + 2
        await relay.wait_log('msg="shutdown signal received; draining"')
        await relay.wait_log('msg="shutdown complete"')
        assert relay.count_log("drain incomplete") == 0
        assert await refused(relay.port)


async def test_drain_deadline_with_unresponsive_peer() -> None:  # I84 (§11 steps 1, 3, 5)
    async with start_relay("--drain-timeout=500ms", "--write-timeout=5s") as relay:
        raw = await RawWs.connect(relay, "server", "s1")  # will not answer the close
        await relay.wait_counts(1, 0)
        t0 = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        await relay.wait_log('msg="shutdown signal received; draining"')
        relay.proc.send_signal(signal.SIGTERM)  # a second signal is ignored
        async with asyncio.timeout(DRAIN + 2):
            code = await relay.proc.wait()
        elapsed = time.monotonic() - t0
        assert code == 0  # a signal started the drain: 0 even past the deadline
        assert 0.4 <= elapsed <= 2.5, elapsed
        await relay.wait_log('msg="drain incomplete"')
        assert relay.count_log("shutdown signal received") == 1
        assert relay.count_log("shutdown complete") == 0
        code_seen, reason, _ = await raw_read_close(raw)
        assert (code_seen, reason) == (1001, "shutting down")
        raw.close()


HANGUP = 'msg="reload signal received; nothing to reload" signal=SIGHUP'


async def test_sighup_is_logged_once_and_never_fatal() -> None:
    # Like nginx and Caddy, SIGHUP means "reload": only static TLS has something to reload
    # (test_tls_static.py); in insecure mode the relay says so and serves on, pairs intact.
    async with start_relay() as relay:
        b, p, cid = await paired(relay, "s1")
        for n in (1, 2):
            relay.proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(5):
                while relay.count_log(HANGUP) < n:
                    await relay.wait_log(HANGUP)
                    await asyncio.sleep(0.01)
        assert relay.count_log(HANGUP + " mode=insecure") == 2
        await b.send(json.dumps({"conn_id": cid, "frame": {"after": "hup"}}))
        assert await recv_json(p) == {"after": "hup"}
        assert relay.proc.returncode is None
        assert await relay.stop(signal.SIGTERM) == 0
        assert relay.count_log("shutdown signal received") == 1


async def test_sigterm_without_connections() -> None:  # I85, I73 (insecure alone serves)
    async with start_relay() as relay:
        status, _, _ = await relay.http("GET", "/healthz")
        assert status == 200
        t0 = time.monotonic()
        assert await relay.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 <= DRAIN + 2
        assert await refused(relay.port)
        assert await refused(relay.metrics_port)
        await relay.wait_log('msg="shutdown complete"')


async def test_listener_error_exit_1() -> None:  # I86
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = await run_relay(f"--insecure-listen=127.0.0.1:{port}", "--metrics-listen=")
        assert code == 1
        line = refusal_line(out, 'msg="listener failed"')
        assert f"addr=127.0.0.1:{port}" in line
        assert "msg=starting " not in out
        # the metrics listener failing is a listener failure too
        code, out = await run_relay(insecure(), f"--metrics-listen=127.0.0.1:{port}")
        assert code == 1
        line = refusal_line(out, 'msg="listener failed"')
        assert f"addr=127.0.0.1:{port}" in line


# -- logs ---------------------------------------------------------------------------------


async def test_json_log_format() -> None:  # I87: --log-format=json (README §2)
    port = free_port()
    argv = relay_command(
        f"--insecure-listen=127.0.0.1:{port}",
        "--metrics-listen=",
        *FAST_TIMERS,
        "--log-format=json",
    )
    async with launch(argv, port=port, ready='"msg":"starting"') as relay:
        await paired(relay, "s1")
        await relay.wait_log('"msg":"phone_registered"')
        assert await relay.stop() == 0
    records = [json.loads(line) for line in relay.lines]  # every line is one JSON object
    assert all(isinstance(r, dict) and {"time", "level", "msg"} <= r.keys() for r in records)
    by_msg = {r["msg"]: r for r in records}
    assert by_msg["starting"]["version"] == __version__
    assert by_msg["server_claimed"]["server_id"] == "s1"
    assert by_msg["phone_registered"]["device_name"] == "Pixel 8"
    assert "shutdown complete" in by_msg
    code, out = await run_relay("--log-format=json")  # refusals use the format too
    assert code == 2
    assert json.loads(out)["msg"].startswith("either --domain")


MARK = "mk9q"  # every secret below contains it; the logs must never


async def marked_phone(relay: Relay, server_id: str) -> ClientConnection:
    return await websockets.connect(
        f"{relay.url}/v1/client",
        additional_headers={
            "X-Pyrycode-Server": server_id,
            "X-Pyrycode-Token": TOKEN,
            "X-Pyrycode-Device-Name": "Pixel 8",
            "Authorization": f"Bearer auth-{MARK}",
            "Cookie": f"session=cookie-{MARK}",
            "X-Forwarded-For": f"xff-{MARK}",
        },
        user_agent_header=f"ua-{MARK}/1.0",
        compression=None,
    )


async def test_log_hygiene_busy_session() -> None:  # I87
    async with start_relay() as relay:
        b = await binary(relay, "s1")
        p = await marked_phone(relay, "s1")
        await p.send(f'{{"noise_init":"p2b-{MARK}"}}')
        cid = (await recv_json(b))["conn_id"]
        await b.send(f'{{"conn_id":"{cid}","frame":{{"noise_msg":"b2p-{MARK}"}}}}')
        assert await recv_json(p) == {"noise_msg": f"b2p-{MARK}"}
        # refused and malformed traffic that the relay does log about
        await b.send(f'{{"push_wake":{{"platform":"fcm","token":"fcm-{MARK}"}}}}')
        await b.send(f"garbage-{MARK}")
        await b.send(f'{{"conn_id":7,"frame":"badenv-{MARK}"}}')
        await b.send(f'{{"conn_id":"client-s1-00000000","frame":"unknown-{MARK}"}}')
        await relay.wait_log("msg=binary_forwarder_unknown_conn_id")
        await b.send(f'{{"conn_id":"{cid}","frame":{{"error":"dir-{MARK}"}},"close_code":4401}}')
        assert await recv_json(p) == {"error": f"dir-{MARK}"}
        assert (await closed_with(p))[0] == 4401
        p2 = await marked_phone(relay, "s1")
        await p2.send(f"not json {MARK}")
        assert (await closed_with(p2))[0] == 1000
        p3 = await marked_phone(relay, "nobody")  # 4404
        assert (await closed_with(p3))[0] == 4404
        headers = {**upgrade_headers("client", "s1"), "User-Agent": "", "Cookie": f"c-{MARK}"}
        status, _, _ = await relay.http("GET", "/v1/client", headers)  # header gate
        assert status == 400
        status, _, _ = await relay.http("GET", f"/no/such/{MARK}", headers)
        assert status == 404
        await relay.wait_log("msg=phone_forwarder_marshal_err")
        await relay.wait_log("msg=binary_forwarder_push_wake_dropped")
        assert await relay.stop() == 0
        log = relay.log
        assert relay.count_log("binary_forwarder_unmarshal_err") == 2
        for secret in (MARK, TOKEN, "pyry/0.11.0", "Bearer", "session="):
            assert secret not in log, secret
