"""`--log-format json`: every line the process writes is one JSON object with allowlisted
keys, in every mode (insecure with push, static TLS, ACME, cluster), including what Python
and libraries report on their own (warnings, stdlib `logging` records).

Each relay runs in Python's development mode (PYTHONDEVMODE=1): every warning category is
shown and asyncio reports slow callbacks through `logging`, so anything that would bypass
the relay's logger has its chance to. At `--log-level=debug` the push sender's HTTP client
(httpx) logs each request through stdlib `logging`: that record must arrive as a relay line.
"""

from __future__ import annotations

import json
import signal
import ssl
from pathlib import Path
from typing import Any

import pytest

from pyrycode_relay.ops.log import ALLOWED_KEYS
from pyrycode_relay.tools.bench.ports import free_port
from tests.certs import make_ca, write_leaf
from tests.e2e.clusterharness import redis_server, start_cluster
from tests.e2e.fake_google import fake_google, push_env
from tests.e2e.harness import Relay, binary, paired, phone, recv_json, start_relay
from tests.e2e.test_cluster import SID, join, round_trip
from tests.e2e.test_tls_acme import acme_flags, pebble
from tests.e2e.tlsharness import (
    client_context,
    start_tls_relay,
    tls_binary,
    tls_phone,
    tls_request,
)

JSON = ("--log-format=json", "--log-level=debug")
DEV = {"PYTHONDEVMODE": "1"}
READY = '"msg":"starting"'


def records(relay: Relay) -> list[dict[str, Any]]:
    """Every line of stdout and stderr, parsed; fails on the first that is not a record."""
    out = []
    for line in relay.stdout_lines + relay.lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert list(record)[:3] == ["time", "level", "msg"], line
        assert set(record) - {"time", "level", "msg"} <= ALLOWED_KEYS, line
        assert record["level"] in ("DEBUG", "INFO", "WARN", "ERROR"), line
        out.append(record)
    assert out, "the relay wrote nothing"
    return out


def messages(relay: Relay) -> list[str]:
    return [r["msg"] for r in records(relay)]


async def stopped(relay: Relay) -> list[str]:
    """SIGTERM, a clean exit, then every line checked: the messages logged."""
    assert await relay.stop(signal.SIGTERM) == 0, relay.log
    logged = messages(relay)
    assert "shutdown complete" in logged, logged
    return logged


async def test_insecure_with_push() -> None:
    async with fake_google() as fake:
        env = DEV | push_env(fake)
        flags = (f"--fcm-endpoint={fake.url}", *JSON)
        async with start_relay(*flags, env=env, ready=READY) as relay:
            b, p, cid = await paired(relay, "s1")
            await b.send(json.dumps({"conn_id": cid, "frame": {"n": 1}}))
            assert await recv_json(p) == {"n": 1}
            await b.send('{"push_wake":{"platform":"fcm","token":"fcm-json-logs"}}')
            await fake.wait_sends(1)
            await relay.wait_log('"msg":"push_wake_sent"')
            status, _, _ = await relay.http("GET", "/v1/server")  # refused: no upgrade
            assert status == 400
            await p.close()
            await b.close()
            logged = await stopped(relay)
    assert "library log" in logged  # httpx's record of its request, as a relay line
    assert {"starting", "server_claimed", "push_wake_sent"} <= set(logged)


async def test_static_tls(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", ["localhost"])
    ctx = client_context(ca.pem)
    flags = (f"--tls-cert={cert}", f"--tls-key={key}", *JSON)
    async with start_tls_relay(*flags, env=DEV, ready=READY) as relay:
        b = await tls_binary(relay.port, ctx, "s1")
        p = await tls_phone(relay.port, ctx, "s1")
        await p.send('{"hello":1}')
        assert (await recv_json(b))["frame"] == {"hello": 1}
        relay.proc.send_signal(signal.SIGHUP)
        await relay.wait_log('"msg":"tls certificate reloaded"')
        with pytest.raises((ssl.SSLError, ConnectionError)):  # another name: refused
            await tls_request(relay.port, ctx, "/healthz", sni="other.localhost")
        await p.close()
        await b.close()
        logged = await stopped(relay)
    assert {"tls certificate loaded", "tls certificate reloaded"} <= set(logged)


async def test_acme(tmp_path: Path) -> None:
    http_port = free_port()
    async with pebble(tmp_path, http_port) as acme:
        flags = (*acme_flags(acme, tmp_path / "certs", http_port), *JSON)
        ready = '"msg":"acme certificate obtained"'
        async with start_tls_relay(*flags, env=DEV, ready=ready) as relay:
            ctx = ssl.create_default_context(cadata=acme.root_pem.decode())
            b = await tls_binary(relay.port, ctx, "s1")
            p = await tls_phone(relay.port, ctx, "s1")
            await p.send('{"hello":1}')
            assert (await recv_json(b))["frame"] == {"hello": 1}
            await p.close()
            await b.close()
            logged = await stopped(relay)
    assert {"starting", "acme certificate obtained"} <= set(logged)


async def test_cluster() -> None:
    async with (
        redis_server() as redis,
        start_cluster(redis, 2, *JSON, env=DEV, ready=READY) as c,
    ):
        r1, r2 = c.relays
        await c.wait_ready()
        b = await binary(r1, SID)
        await c.wait_owner(SID, r1)
        await r1.wait_log('"msg":"server_claimed"')
        p, cid = await join(r2, b)
        await round_trip(b, p, cid, "json")
        local = await phone(r1, SID)
        await local.close()
        await p.close()
        await b.close()
        logged = [await stopped(r) for r in (r1, r2)]
    for each in logged:
        assert {"cluster_redis_up", "starting"} <= set(each)
