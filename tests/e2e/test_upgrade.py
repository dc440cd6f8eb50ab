"""Conformance §15 A: upgrade, header gate, conn ids, registration outcomes."""

from __future__ import annotations

import re

import pytest

from tests.e2e.harness import (
    assert_silent,
    binary,
    closed_with,
    http_request,
    phone,
    recv_json,
    start_relay,
    upgrade_headers,
)


def upgrades(endpoint: str, outcome: str) -> str:
    return f'pyrycode_relay_ws_upgrade_attempts_total{{endpoint="{endpoint}",outcome="{outcome}"}}'


async def test_binary_valid_upgrade_registers() -> None:  # A1
    async with start_relay() as relay:
        b = await binary(relay, "s1")
        await relay.wait_counts(1, 0)
        await assert_silent(b)
        await relay.wait_log(
            "msg=server_claimed server_id=s1 binary_version=0.11.0 remote=127.0.0.1"
        )


@pytest.mark.parametrize(
    ("endpoint", "header"),
    [
        ("server", "X-Pyrycode-Server"),
        ("server", "X-Pyrycode-Version"),
        ("server", "User-Agent"),
        ("client", "X-Pyrycode-Server"),
        ("client", "X-Pyrycode-Token"),
        ("client", "User-Agent"),
    ],
)
@pytest.mark.parametrize("mode", ["missing", "empty", "spaces"])
async def test_header_gate_400(endpoint: str, header: str, mode: str) -> None:  # A2, A4
    async with start_relay() as relay:
        headers = upgrade_headers(endpoint, "s1")
        if mode == "missing":
            del headers[header]
        else:
            headers[header] = "" if mode == "empty" else "   "
        status, resp_headers, body = await http_request(
            relay.port, "GET", f"/v1/{endpoint}", headers
        )
        assert (status, body) == (400, b"\n")
        assert resp_headers["content-type"] == "text/plain; charset=utf-8"
        assert resp_headers["x-content-type-options"] == "nosniff"
        assert await relay.counts() == (0, 0)
        metrics = await relay.metrics()
        assert metrics[upgrades(endpoint, "reject_headers")] == 1
        assert "x-pyrycode" not in relay.log.lower().replace("pyrycode_relay_", "")


async def test_wrong_method_or_no_upgrade_is_4xx() -> None:  # A3
    async with start_relay() as relay:
        good = upgrade_headers("server", "s1")
        no_upgrade = {k: v for k, v in good.items() if k not in ("Upgrade", "Connection")}
        status, _, _ = await http_request(relay.port, "GET", "/v1/server", no_upgrade)
        assert status == 426
        status, _, _ = await http_request(relay.port, "POST", "/v1/server", good)
        assert status == 405
        bad_version = {**good, "Sec-WebSocket-Version": "8"}
        status, _, _ = await http_request(relay.port, "GET", "/v1/server", bad_version)
        assert status == 400
        assert await relay.counts() == (0, 0)


@pytest.mark.parametrize("device_name", [None, "Pixel 8"])
async def test_device_name_optional(device_name: str | None) -> None:  # A5
    async with start_relay() as relay:
        await binary(relay, "s1")
        p = await phone(relay, "s1", device_name=device_name)
        await relay.wait_counts(1, 1)
        await assert_silent(p)
        shown = '"Pixel 8"' if device_name else '""'
        await relay.wait_log(f"device_name={shown}")


async def test_phone_frame_is_wrapped_with_conn_id() -> None:  # A6
    async with start_relay() as relay:
        b = await binary(relay, "s1")
        p = await phone(relay, "s1")
        await p.send('{"x":1}')
        raw = await b.recv()
        assert isinstance(raw, str)
        m = re.fullmatch(r'\{"conn_id":"client-s1-([0-9a-f]{8})","frame":\{"x":1\}\}', raw)
        assert m, raw


async def test_no_binary_4404() -> None:  # A7
    async with start_relay() as relay:
        p = await phone(relay, "nobody")
        assert await closed_with(p) == (4404, "no server with that id")
        await relay.wait_counts(0, 0)
        m = await relay.metrics()
        assert m[upgrades("client", "reject_404")] == 1
        assert m['pyrycode_relay_register_failures_total{kind="no_server"}'] == 1


async def test_phone_cap_4429_recovery_and_independence() -> None:  # A8, A9
    async with start_relay("--max-phones-per-server=2") as relay:
        b = await binary(relay, "s1")
        p1 = await phone(relay, "s1")
        p2 = await phone(relay, "s1")
        p3 = await phone(relay, "s1")
        assert await closed_with(p3) == (4429, "too many phones for server-id")
        await p1.send('{"still":"works"}')
        assert (await recv_json(b))["frame"] == {"still": "works"}
        await p2.send("[2]")
        assert (await recv_json(b))["frame"] == [2]
        # independence: a full s1 does not affect s2
        await binary(relay, "s2")
        q = await phone(relay, "s2")
        await assert_silent(q, 0.1)
        # recovery: after one phone leaves, a new one is accepted
        await p1.close()
        await recv_json(b)  # p1's close notice
        p4 = await phone(relay, "s1")
        await assert_silent(p4, 0.1)
        await relay.wait_counts(2, 3)
        m = await relay.metrics()
        assert m[upgrades("client", "reject_429")] == 1
        assert m['pyrycode_relay_register_failures_total{kind="phones_at_cap"}'] == 1


async def test_no_binary_beats_cap() -> None:  # A10
    async with start_relay("--max-phones-per-server=1") as relay:
        p = await phone(relay, "s1")
        assert (await closed_with(p))[0] == 4404


async def test_phone_disconnect_unregisters_others_unaffected() -> None:  # A11
    async with start_relay() as relay:
        b = await binary(relay, "s1")
        phones = [await phone(relay, "s1") for _ in range(3)]
        await relay.wait_counts(1, 3)
        await phones[1].close()
        await relay.wait_counts(1, 2)
        await phones[0].close()
        await relay.wait_counts(1, 1)
        await phones[2].send('{"n":3}')
        # two close notices, then the frame
        msgs = [await recv_json(b) for _ in range(3)]
        assert [m.get("close_code") for m in msgs[:2]] == [1000, 1000]
        assert msgs[2]["frame"] == {"n": 3}
