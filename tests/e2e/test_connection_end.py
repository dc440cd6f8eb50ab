"""What an operator sees of each WebSocket and of the certificate: one `ws_closed` line per
WebSocket (endpoint, close code, who closed first, duration_ms), the upgrade and lifetime
histograms and build_info on /metrics, and, in static TLS mode, a line and a gauge for a
certificate that has expired or expires within 14 days (at start and on SIGHUP)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import signal
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from pyrycode_relay import __version__
from pyrycode_relay.tools.bench.ports import free_port
from tests.certs import make_ca, write_leaf
from tests.e2e.harness import Relay, binary, closed_with, http_request, paired, phone, start_relay
from tests.e2e.tlsharness import DOMAIN, start_tls_relay

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
NOT_AFTER = "pyrycode_relay_tls_certificate_not_after_seconds"


def fields(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _FIELD.findall(line)}


def how(line: dict[str, str]) -> tuple[str, str, str]:
    return line["endpoint"], line["close_code"], line["closed_by"]


async def close_code_after_notices(ws: ClientConnection) -> int:
    """A binary's close code, past the close notices of its phones that left before it."""
    async with asyncio.timeout(5):
        try:
            while True:
                assert "close_code" in json.loads(await ws.recv())
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code


async def closed_lines(relay: Relay, count: int) -> list[dict[str, str]]:
    """The first `count` ws_closed lines, waiting (bounded) until there are that many."""
    async with asyncio.timeout(5):
        while relay.count_log("msg=ws_closed") < count:
            await asyncio.sleep(0.02)
    return [fields(line) for line in relay.lines if "msg=ws_closed" in line][:count]


async def scrape(port: int) -> dict[str, float]:
    status, _, body = await http_request(port, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


async def test_every_websocket_end_is_one_line_with_its_code_closer_and_duration() -> None:
    async with start_relay() as relay:
        stray = await phone(relay, "nobody")  # no binary: the relay refuses it, 4404
        assert (await closed_with(stray))[0] == 4404
        refused = (await closed_lines(relay, 1))[0]
        assert how(refused) == ("client", "4404", "relay")
        assert refused["server_id"] == "nobody"
        assert refused["conn_id"].startswith("client-nobody-")

        b, p, conn_id = await paired(relay, "s1")
        await asyncio.sleep(0.25)  # a lifetime long enough to tell from zero
        await p.close()  # the phone closes first, 1000
        left = (await closed_lines(relay, 2))[1]
        assert left["conn_id"] == conn_id
        assert how(left) == ("client", "1000", "peer")
        assert int(left["duration_ms"]) >= 250

        dropped = await phone(relay, "s1")
        dropped.transport.abort()  # TCP gone, no close frame either way
        gone = (await closed_lines(relay, 3))[2]
        assert how(gone) == ("client", "1006", "none")

        got = await scrape(relay.metrics_port)
        up = "pyrycode_relay_ws_upgrade_duration_seconds"
        life = "pyrycode_relay_ws_connection_duration_seconds"
        assert got[f'{up}_count{{endpoint="client"}}'] == 3
        assert got[f'{up}_count{{endpoint="server"}}'] == 1
        assert got[f'{up}_bucket{{endpoint="server",le="+Inf"}}'] == 1
        assert got[f'{life}_count{{endpoint="client"}}'] == 3
        assert got[f'{life}_count{{endpoint="server"}}'] == 0  # the binary is still up
        assert got[f'{life}_sum{{endpoint="client"}}'] >= 0.25
        # the 4404 refusal ended well within the first bucket
        assert got[f'{life}_bucket{{endpoint="client",le="0.1"}}'] >= 1
        build = [s for s in got if s.startswith("pyrycode_relay_build_info{")]
        assert len(build) == 1 and got[build[0]] == 1
        assert f'version="{__version__}"' in build[0]
        assert 'revision=""' in build[0]  # an editable install knows no revision
        assert 'event_loop="uvloop"' in build[0] or 'event_loop="asyncio"' in build[0]

        assert await relay.stop() == 0  # the drain closes the binary 1001
        assert await close_code_after_notices(b) == 1001
        drained = (await closed_lines(relay, 4))[3]
        assert drained["server_id"] == "s1"
        assert how(drained) == ("server", "1001", "relay")


async def test_a_binary_that_closes_is_logged_as_closed_by_the_peer() -> None:
    async with start_relay() as relay:
        b = await binary(relay, "s2")
        await b.close(4000, "bye")
        line = (await closed_lines(relay, 1))[0]
        assert how(line) == ("server", "4000", "peer")


def _utc_in(days: float) -> dt.datetime:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).replace(microsecond=0)


@pytest.mark.parametrize(
    ("days", "level", "event"),
    [(-3, "ERROR", "tls certificate has expired"), (5, "WARN", "tls certificate expires soon")],
)
async def test_a_static_certificate_near_or_past_expiry_is_announced_and_exported(
    tmp_path: Path, days: int, level: str, event: str
) -> None:
    ca = make_ca()
    not_after = _utc_in(days)
    cert, key, serial = write_leaf(ca, tmp_path, "relay", [DOMAIN], not_after=not_after)
    metrics_port = free_port()
    async with start_tls_relay(
        f"--tls-cert={cert}", f"--tls-key={key}", f"--metrics-listen=127.0.0.1:{metrics_port}"
    ) as relay:
        line = fields(await relay.wait_log(f'msg="{event}"'))
        assert line["level"] == level
        assert line["not_after"] == f"{not_after:%Y-%m-%dT%H:%M:%SZ}"
        assert float(line["days_left"]) == pytest.approx(days, abs=0.1)
        assert int(line["serial"], 16) == serial
        assert "SIGHUP" in line["fix"]
        got = await scrape(metrics_port)
        assert got[NOT_AFTER] == not_after.timestamp()


async def test_a_reload_announces_an_expiring_certificate_and_moves_the_gauge(
    tmp_path: Path,
) -> None:
    ca = make_ca()
    fresh = _utc_in(90)
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN], not_after=fresh)
    metrics_port = free_port()
    async with start_tls_relay(
        f"--tls-cert={cert}", f"--tls-key={key}", f"--metrics-listen=127.0.0.1:{metrics_port}"
    ) as relay:
        assert (await scrape(metrics_port))[NOT_AFTER] == fresh.timestamp()
        assert relay.count_log("tls certificate expires soon") == 0  # 90 days: nothing to say
        soon = _utc_in(5)
        write_leaf(ca, tmp_path, "relay", [DOMAIN], not_after=soon)
        relay.proc.send_signal(signal.SIGHUP)
        line = fields(await relay.wait_log('msg="tls certificate expires soon"'))
        assert line["not_after"] == f"{soon:%Y-%m-%dT%H:%M:%SZ}"
        assert (await scrape(metrics_port))[NOT_AFTER] == soon.timestamp()
        assert relay.count_log("tls certificate has expired") == 0
