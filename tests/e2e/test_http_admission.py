"""Conformance §15 H: /healthz, unknown paths, rate limit, XFF, connection caps, metrics."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from pyrycode_relay import __version__
from tests.e2e.harness import (
    TOKEN,
    Relay,
    assert_silent,
    binary,
    closed_with,
    http_request,
    phone,
    recv_json,
    start_relay,
    upgrade_headers,
    wait_metric,
)

HEALTHZ = re.compile(
    rb'\{"status":"ok","version":"'
    + re.escape(__version__.encode())
    + rb'","connected_binaries":(0|[1-9][0-9]*),"connected_phones":(0|[1-9][0-9]*)'
    rb',"uptime_seconds":(0|[1-9][0-9]*)\}'
)
TEXT_PLAIN = "text/plain; charset=utf-8"
ATTEMPTS = "pyrycode_relay_ws_upgrade_attempts_total"


def attempts(endpoint: str, outcome: str) -> str:
    return f'{ATTEMPTS}{{endpoint="{endpoint}",outcome="{outcome}"}}'


def cap_rejections(scope: str) -> str:
    return f'pyrycode_relay_conn_cap_rejections_total{{scope="{scope}"}}'


def gate_failing(endpoint: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Upgrade headers that fail the header gate (400): no User-Agent."""
    headers = upgrade_headers(endpoint, "s1")
    del headers["User-Agent"]
    headers.update(extra or {})
    return headers


async def attempt(relay: Relay, endpoint: str, extra: Mapping[str, str] | None = None) -> int:
    """One upgrade attempt that cannot succeed past the header gate: 400, 429 or 503."""
    status, _, _ = await relay.http("GET", f"/v1/{endpoint}", gate_failing(endpoint, extra))
    return status


async def from_ip(port: int, source: str, endpoint: str) -> int:
    """The status of a header-gate-failing upgrade attempt sent from another loopback IP."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        lines = [f"GET /v1/{endpoint} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in gate_failing(endpoint).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
    return int(raw.split(b" ", 2)[1])


async def connect_when_free(relay: Relay, server_id: str, *, as_phone: bool) -> ClientConnection:
    """Connect once the relay has released a slot; the release follows the peer's TCP close
    by a moment, so a 503 is retried a bounded number of times."""
    for _ in range(50):
        try:
            if as_phone:
                return await phone(relay, server_id)
            return await binary(relay, server_id)
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            await asyncio.sleep(0.02)
    raise AssertionError("the slot was never released")


# -- /healthz ----------------------------------------------------------------------------


async def test_healthz_shape_and_headers() -> None:  # H62
    async with start_relay() as relay:
        lines = len(relay.lines)
        for method in ("GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            status, headers, body = await relay.http(method, "/healthz")
            assert status == 200, method
            assert HEALTHZ.fullmatch(body), body  # key order, compact, no trailing newline
            assert len(body) < 200
            assert headers["content-type"] == "application/json; charset=utf-8"
            assert headers["cache-control"] == "no-store"
        status, _, body = await relay.http("GET", "/healthz?verbose=1&x")
        assert status == 200 and HEALTHZ.fullmatch(body)
        assert len(relay.lines) == lines  # /healthz is never logged


async def test_healthz_counts_follow_registrations() -> None:  # H62
    async with start_relay() as relay:
        assert await relay.counts() == (0, 0)
        b = await binary(relay, "s1")
        await relay.wait_counts(1, 0)
        p1 = await phone(relay, "s1")
        await phone(relay, "s1")
        await relay.wait_counts(1, 2)
        await binary(relay, "s2")
        await relay.wait_counts(2, 2)
        await p1.close()
        await relay.wait_counts(2, 1)
        await b.close()
        await relay.wait_counts(1, 1)  # s1 in grace: its binary no longer counts
        h = await relay.healthz()
        assert h["uptime_seconds"] >= 0


async def test_healthz_never_429_or_503() -> None:  # H62
    async with start_relay("--rate-limit-burst=1", "--max-connections=1") as relay:
        await binary(relay, "s1")  # the only token and the only slot
        assert await attempt(relay, "client") == 429
        for _ in range(30):
            status, _, body = await relay.http("GET", "/healthz")
            assert status == 200 and HEALTHZ.fullmatch(body)
        assert await relay.counts() == (1, 0)


# -- unknown paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/v2/server", "/v2/client", "/v1", "/v1/server/", "/healthz/", "/metrics"]
)
async def test_unknown_path_404(path: str) -> None:  # H63
    async with start_relay("--rate-limit-burst=1") as relay:
        for method in ("GET", "POST"):
            status, headers, body = await relay.http(method, path, upgrade_headers("server", "s"))
            assert (status, body) == (404, b"404 page not found\n")
            assert headers["content-type"] == TEXT_PLAIN
        # a 404 costs no rate-limit token: the single token is still there
        b = await binary(relay, "s1")
        await assert_silent(b, 0.05)
        await relay.wait_counts(1, 0)


# -- rate limit --------------------------------------------------------------------------------


async def test_rate_limit_burst_then_429() -> None:  # H64
    async with start_relay("--rate-limit-burst=20") as relay:
        # 20 attempts from 127.0.0.1, mixing endpoints and outcomes
        for i in range(5):
            await binary(relay, f"s{i}")  # 101, claimed
        for _ in range(5):
            await phone(relay, "s0")  # 101, registered
        for endpoint in ("server", "client"):
            for _ in range(5):
                assert await attempt(relay, endpoint) == 400  # header gate: still a token
        await relay.wait_counts(5, 5)
        # the 21st
        status, headers, body = await relay.http(
            "GET", "/v1/client", upgrade_headers("client", "s0")
        )
        assert (status, body) == (429, b"\n")
        assert headers["content-type"] == TEXT_PLAIN
        assert headers["x-content-type-options"] == "nosniff"
        with pytest.raises(InvalidStatus) as exc:
            await binary(relay, "s9")
        assert exc.value.response.status_code == 429
        await relay.wait_log('level=WARN msg=rate_limited remote="\\"127.0.0.1\\""')
        assert relay.count_log("msg=rate_limited") == 2
        m = await relay.metrics()
        assert m[attempts("client", "reject_rate_limit")] == 1
        assert m[attempts("server", "reject_rate_limit")] == 1
        assert m['pyrycode_relay_register_failures_total{kind="ratelimit"}'] == 2
        assert (
            m[attempts("server", "reject_headers")] == m[attempts("client", "reject_headers")] == 5
        )
        assert m[attempts("server", "accept")] == m[attempts("client", "accept")] == 5
        assert await relay.counts() == (5, 5)  # a rate-limited request never registers


async def test_rate_limit_refill() -> None:  # H64
    async with start_relay("--rate-limit-burst=2", "--rate-limit-interval=500ms") as relay:
        t0 = time.monotonic()
        assert [await attempt(relay, "server") for _ in range(3)] == [400, 400, 429]
        # denied attempts do not delay the refill; poll until the one new token appears
        for _ in range(100):
            status = await attempt(relay, "client")
            if status != 429:
                break
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - t0
        assert status == 400
        assert 0.45 <= elapsed <= 1.5, elapsed
        assert await attempt(relay, "client") == 429  # exactly one token came back


async def test_rate_limit_per_ip_with_trusted_xff() -> None:  # H64, H65
    async with start_relay("--rate-limit-burst=3", "--trust-x-forwarded-for") as relay:
        a = {"X-Forwarded-For": "203.0.113.7"}
        assert [await attempt(relay, "server", a) for _ in range(3)] == [400] * 3
        assert await attempt(relay, "client", a) == 429
        # the left-most entry is the key
        assert await attempt(relay, "client", {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}) == 429
        # other IPs are unaffected
        assert await attempt(relay, "client", {"X-Forwarded-For": "203.0.113.8"}) == 400
        assert await attempt(relay, "server") == 400  # no XFF: the peer address
        assert await attempt(relay, "server", {"X-Forwarded-For": " , 198.51.100.4"}) == 400
        await relay.wait_log('msg=rate_limited remote="\\"203.0.113.7\\""')
        assert relay.count_log("msg=rate_limited") == 2
        b = await binary(relay, "s1")  # 127.0.0.1 still has tokens
        await assert_silent(b, 0.05)


async def test_untrusted_xff_does_not_avoid_the_limit() -> None:  # H65
    async with start_relay("--rate-limit-burst=3") as relay:
        for i in range(3):
            assert await attempt(relay, "server", {"X-Forwarded-For": f"198.51.100.{i}"}) == 400
        assert await attempt(relay, "client", {"X-Forwarded-For": "198.51.100.99"}) == 429
        await relay.wait_log('msg=rate_limited remote="\\"127.0.0.1\\""')
        assert "198.51.100" not in relay.log
        # a genuinely different source address has its own bucket
        assert await from_ip(relay.port, "127.0.0.2", "client") == 400


async def test_rate_limit_burst_zero_disables() -> None:  # H64
    async with start_relay("--rate-limit-burst=0") as relay:
        statuses = [await attempt(relay, ("server", "client")[i % 2]) for i in range(30)]
        assert statuses == [400] * 30
        b = await binary(relay, "s1")
        await assert_silent(b, 0.05)
        m = await relay.metrics()
        assert m[attempts("server", "reject_rate_limit")] == 0
        assert m[attempts("client", "reject_rate_limit")] == 0
        assert relay.count_log("rate_limited") == 0


# -- connection caps ---------------------------------------------------------------------------


async def test_global_cap_one() -> None:  # H66
    async with start_relay("--max-connections=1", "--rate-limit-burst=0") as relay:
        await binary(relay, "s1")
        secret_ua = "UA-marker-4d1c"
        headers = {**upgrade_headers("client", "s1-cap-marker"), "User-Agent": secret_ua}
        status, resp_headers, body = await relay.http("GET", "/v1/client", headers)
        assert (status, body) == (503, b"\n")
        assert resp_headers["content-type"] == TEXT_PLAIN
        assert resp_headers["x-content-type-options"] == "nosniff"
        # capped before the header gate: even a request that would fail it gets 503
        assert await attempt(relay, "server") == 503
        with pytest.raises(InvalidStatus) as exc:
            await phone(relay, "s1")
        assert exc.value.response.status_code == 503
        status, _, body = await relay.http("GET", "/healthz")
        assert status == 200 and HEALTHZ.fullmatch(body)
        assert await relay.counts() == (1, 0)
        line = await relay.wait_log("msg=conn_cap_reached")
        assert "level=WARN" in line and "path=/v1/client" in line and "remote=127.0.0.1" in line
        for value in (secret_ua, "s1-cap-marker", TOKEN, "websocket", "Pixel", "1.4.2"):
            assert value not in relay.log
        m = await relay.metrics()
        assert m[cap_rejections("global")] == 3
        assert m[cap_rejections("per_ip")] == 0
        # 503s are no upgrade outcome (reference §5.7: no reference series moves)
        assert (
            m[attempts("client", "reject_headers")] == m[attempts("server", "reject_headers")] == 0
        )
        assert m[attempts("client", "accept")] == 0


async def test_rate_limit_checked_before_cap() -> None:  # H64, H66 (order §1.2)
    async with start_relay("--max-connections=1", "--rate-limit-burst=2") as relay:
        b = await binary(relay, "s1")  # token 1, the only slot
        assert await attempt(relay, "client") == 503  # token 2
        assert await attempt(relay, "client") == 429  # over both: the rate limit answers
        for _ in range(10):  # rate-limited requests never take (or leak) a slot
            assert await attempt(relay, "server") == 429
        m = await relay.metrics()
        assert m[cap_rejections("global")] == 1
        assert m[attempts("client", "reject_rate_limit")] == 1
        await assert_silent(b, 0.05)


async def test_refused_upgrades_release_their_slot() -> None:  # H66
    async with start_relay("--max-connections=1", "--rate-limit-burst=0") as relay:
        for endpoint in ("server", "client"):
            assert await attempt(relay, endpoint) == 400  # header gate, after the cap
        no_upgrade = upgrade_headers("server", "s1")
        del no_upgrade["Upgrade"]
        status, _, _ = await relay.http("GET", "/v1/server", no_upgrade)
        assert status == 426
        b = await connect_when_free(relay, "s1", as_phone=False)
        await assert_silent(b, 0.05)
        await relay.wait_counts(1, 0)


async def test_global_cap_slot_freed_when_phone_leaves() -> None:  # H66
    async with start_relay("--max-connections=2", "--rate-limit-burst=0") as relay:
        b = await binary(relay, "s1")
        p = await phone(relay, "s1")
        with pytest.raises(InvalidStatus) as exc:
            await phone(relay, "s1")
        assert exc.value.response.status_code == 503
        await p.close()
        await relay.wait_counts(1, 0)
        p2 = await connect_when_free(relay, "s1", as_phone=True)
        await p2.send("[1]")
        assert (await recv_json(b)).get("close_code") == 1000  # p's notice
        assert (await recv_json(b))["frame"] == [1]


async def test_global_cap_4404_phone_frees_its_slot() -> None:  # H66
    async with start_relay("--max-connections=1", "--rate-limit-burst=0") as relay:
        p = await phone(relay, "nobody")
        assert (await closed_with(p))[0] == 4404
        b = await connect_when_free(relay, "s1", as_phone=False)
        await assert_silent(b, 0.05)
        await relay.wait_counts(1, 0)


async def test_global_cap_grace_expiry_frees_phone_slots() -> None:  # H66
    async with start_relay("--max-connections=2", "--rate-limit-burst=0") as relay:
        b = await binary(relay, "s1")
        p = await phone(relay, "s1")
        await relay.wait_counts(1, 1)
        await b.close()
        await relay.wait_counts(0, 1)  # grace: the phone still holds its slot
        b2 = await connect_when_free(relay, "s2", as_phone=False)
        with pytest.raises(InvalidStatus) as exc:
            await phone(relay, "s2")
        assert exc.value.response.status_code == 503
        assert await closed_with(p) == (1000, "")  # grace expiry tears the phone down
        p2 = await connect_when_free(relay, "s2", as_phone=True)
        await p2.send("{}")
        assert (await recv_json(b2))["frame"] == {}
        await wait_metric(relay, "pyrycode_relay_grace_expiries_total", 1)


async def test_per_ip_cap() -> None:  # H66 (README: --max-connections-per-ip)
    async with start_relay("--max-connections-per-ip=1", "--rate-limit-burst=0") as relay:
        b = await binary(relay, "s1")
        with pytest.raises(InvalidStatus) as exc:
            await phone(relay, "s1")
        assert exc.value.response.status_code == 503
        line = await relay.wait_log("msg=conn_cap_reached")
        assert "path=/v1/client" in line
        m = await relay.metrics()
        assert m[cap_rejections("per_ip")] == 1
        assert m[cap_rejections("global")] == 0
        # another source address has its own allowance
        p = await phone(relay, "s1", local_addr=("127.0.0.2", 0))
        await p.send("[7]")
        assert (await recv_json(b))["frame"] == [7]
        await b.close()
        b2 = await connect_when_free(relay, "s2", as_phone=False)
        await assert_silent(b2, 0.05)


# -- metrics -----------------------------------------------------------------------------------

EXPECTED_SERIES = {
    "pyrycode_relay_connected_binaries": "gauge",
    "pyrycode_relay_connected_phones": "gauge",
    "pyrycode_relay_outbox_bytes": "gauge",
    'pyrycode_relay_frames_forwarded_total{direction="phone_to_binary"}': "counter",
    'pyrycode_relay_frames_forwarded_total{direction="binary_to_phone"}': "counter",
    "pyrycode_relay_grace_expiries_total": "counter",
    "pyrycode_relay_takeovers_total": "counter",
    "pyrycode_relay_reclaim_evictions_total": "counter",
    **{
        attempts(e, o): "counter"
        for e in ("server", "client")
        for o in (
            "accept",
            "reject_headers",
            "reject_409",
            "reject_404",
            "reject_429",
            "reject_rate_limit",
        )
    },
    **{
        f'pyrycode_relay_register_failures_total{{kind="{k}"}}': "counter"
        for k in ("no_server", "server_in_use", "phones_at_cap", "ratelimit")
    },
    **{
        hb: "counter"
        for hb in (
            f'pyrycode_relay_heartbeat_closes_total{{endpoint="{e}"}}' for e in ("server", "client")
        )
    },
    cap_rejections("global"): "counter",
    cap_rejections("per_ip"): "counter",
}
TASKS_SERIES = "pyrycode_relay_asyncio_tasks"  # leak detector for soak tests (ADR 0009)
PROMHTTP_SERIES = {
    "promhttp_metric_handler_requests_in_flight",
    'promhttp_metric_handler_requests_total{code="200"}',
    'promhttp_metric_handler_requests_total{code="500"}',
    'promhttp_metric_handler_requests_total{code="503"}',
}


async def test_metrics_exposition_from_startup() -> None:  # H70
    async with start_relay() as relay:
        status, headers, body = await relay.http("GET", "/metrics", port=relay.metrics_port)
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        series: dict[str, float] = {}
        types: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                types[name] = kind
            elif line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                series[name] = float(value)
        # Our additions beyond the reference's set (docs/metrics.md): the build, and the two
        # connection histograms, every bucket of both endpoints at 0 from startup.
        [build] = [name for name in series if name.startswith("pyrycode_relay_build_info{")]
        assert series.pop(build) == 1
        histograms = {
            name: value
            for name, value in series.items()
            if name.startswith(
                ("pyrycode_relay_ws_upgrade_duration_seconds", "pyrycode_relay_ws_connection_")
            )
        }
        for family in ("upgrade", "connection"):
            for endpoint in ("server", "client"):
                count = (
                    f'pyrycode_relay_ws_{family}_duration_seconds_count{{endpoint="{endpoint}"}}'
                )
                assert histograms[count] == 0
        assert set(histograms.values()) == {0}
        for name in histograms:
            del series[name]
        assert set(series) == set(EXPECTED_SERIES) | PROMHTTP_SERIES | {TASKS_SERIES}
        assert series[TASKS_SERIES] >= 1  # at least the relay's main task
        for name, kind in EXPECTED_SERIES.items():
            family = name.split("{")[0]
            assert types.get(family.removesuffix("_total")) == kind or types.get(family) == kind
            assert series[name] == 0, name  # every combination exists at 0 from startup
        for prefix in ("process_", "python_", "go_", "pyrycode_relay_push"):
            assert not re.search(rf"^(# (HELP|TYPE) )?{prefix}", text, re.M), prefix
        assert "_created" not in text


async def test_metrics_track_activity() -> None:  # H70
    async with start_relay() as relay:
        b = await binary(relay, "s1")
        p = await phone(relay, "s1")
        await p.send("[1]")
        cid = (await recv_json(b))["conn_id"]
        await b.send(f'{{"conn_id":"{cid}","frame":[2]}}')
        assert await recv_json(p) == [2]
        m = await relay.metrics()
        assert m["pyrycode_relay_connected_binaries"] == 1
        assert m["pyrycode_relay_connected_phones"] == 1
        assert m['pyrycode_relay_frames_forwarded_total{direction="phone_to_binary"}'] == 1
        assert m['pyrycode_relay_frames_forwarded_total{direction="binary_to_phone"}'] == 1
        assert m[attempts("server", "accept")] == m[attempts("client", "accept")] == 1


@pytest.mark.parametrize("path", ["/", "/metrics/", "/healthz", "/v1/server", "/metricsx"])
async def test_metrics_listener_other_paths_404(path: str) -> None:  # H70
    async with start_relay() as relay:
        status, _, body = await http_request(relay.metrics_port, "GET", path)
        assert (status, body) == (404, b"404 page not found\n")
