"""Static TLS (--tls-cert/--tls-key): serving, SNI and Host gates, SIGHUP reload, bad files."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import pytest

from tests.certs import make_ca, write_leaf
from tests.e2e.harness import closed_with, recv_json, run_relay
from tests.e2e.tlsharness import (
    DOMAIN,
    client_context,
    serial_of,
    start_tls_relay,
    tls_binary,
    tls_phone,
    tls_request,
)


async def test_reload_on_sighup_serves_the_new_serial_while_an_old_websocket_stays_up(
    tmp_path: Path,
) -> None:
    ca = make_ca()
    # A serial whose first hex digit is 0: logged whole, as `openssl x509 -serial` prints it.
    first = 0x0A1B2C3D4E5F60718293A4B5C6D7E8F9010203
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN], serial=first)
    ctx = client_context(ca.pem)
    async with start_tls_relay(f"--tls-cert={cert}", f"--tls-key={key}") as relay:
        line = await relay.wait_log("tls certificate loaded")
        assert line.endswith(" serial=0A1B2C3D4E5F60718293A4B5C6D7E8F9010203"), line
        b = await tls_binary(relay.port, ctx, "s1")
        p = await tls_phone(relay.port, ctx, "s1")
        assert serial_of(b) == serial_of(p) == first
        await p.send('{"n":1}')
        conn_id = (await recv_json(b))["conn_id"]

        # Replace the files in place (as certbot/cert-manager do) and signal.
        _, _, second = write_leaf(ca, tmp_path, "relay", [DOMAIN])
        assert second != first
        relay.proc.send_signal(signal.SIGHUP)
        reloaded = await relay.wait_log("tls certificate reloaded")
        assert int(reloaded.split("serial=", 1)[1].split()[0], 16) == second

        fresh = await tls_phone(relay.port, ctx, "s1")
        assert serial_of(fresh) == second
        # The WebSockets opened under the old certificate still route both ways.
        await p.send('{"n":2}')
        assert await recv_json(b) == {"conn_id": conn_id, "frame": {"n": 2}}
        await b.send(f'{{"conn_id":"{conn_id}","frame":{{"r":1}}}}')
        assert await recv_json(p) == {"r": 1}
        for ws in (fresh, p, b):
            await ws.close()
        assert await relay.stop() == 0


async def test_a_bad_file_at_reload_keeps_the_old_certificate(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, first = write_leaf(ca, tmp_path, "relay", [DOMAIN])
    ctx = client_context(ca.pem)
    async with start_tls_relay(f"--tls-cert={cert}", f"--tls-key={key}") as relay:
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
        relay.proc.send_signal(signal.SIGHUP)
        line = await relay.wait_log("tls certificate reload failed")
        assert "err=" in line
        status, _, serial = await tls_request(relay.port, ctx, "/healthz")
        assert (status, serial) == (200, first)
        # A key that does not match the certificate is refused the same way.
        _, other_key, _ = write_leaf(ca, tmp_path, "other", [DOMAIN])
        write_leaf(ca, tmp_path, "relay", [DOMAIN])
        key.write_bytes(other_key.read_bytes())
        relay.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(5):
            while relay.count_log("tls certificate reload failed") < 2:
                await asyncio.sleep(0.02)
        failed = [x for x in relay.lines if "tls certificate reload failed" in x]
        assert f'err="certificate file {cert}: a PEM certificate in it is malformed"' in failed[0]
        assert 'err="certificate and key do not match"' in failed[1]
        status, _, serial = await tls_request(relay.port, ctx, "/healthz")
        assert (status, serial) == (200, first)


@pytest.mark.parametrize("broken", ["cert", "key", "missing", "mismatch"])
async def test_a_bad_file_at_start_up_exits_2_with_one_line(tmp_path: Path, broken: str) -> None:
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN])
    if broken == "cert":
        cert.write_text("garbage\n")
        words = f"certificate file {cert} holds no PEM certificate"
    elif broken == "key":
        key.write_text("garbage\n")
        words = f"key file {key} holds no PEM private key"
    elif broken == "missing":
        cert.unlink()
        words = f"certificate file {cert}: No such file or directory"
    else:
        _, other_key, _ = write_leaf(ca, tmp_path, "other", [DOMAIN])
        key = other_key
        words = "certificate and key do not match"
    code, out = await run_relay(
        "--https-listen=127.0.0.1:1", f"--tls-cert={cert}", f"--tls-key={key}"
    )
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert "refusing to start: invalid TLS certificate" in lines[0]
    assert f'reason="{words}' in lines[0], lines[0]
    assert "BEGIN" not in out and "NO_CERTIFICATE_ASSIGNED" not in out


async def test_domain_enables_host_and_sni_gates(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN, "other.test"])
    ctx = client_context(ca.pem)
    flags = (f"--tls-cert={cert}", f"--tls-key={key}", f"--domain={DOMAIN}")
    async with start_tls_relay(*flags) as relay:
        status, raw, _ = await tls_request(relay.port, ctx, "/healthz", host="LocalHost:443")
        assert status == 200
        for path in ("/healthz", "/v1/server", "/nope"):
            status, raw, _ = await tls_request(relay.port, ctx, path, host="other.test")
            assert status == 421
            assert raw.endswith(b"\r\n\r\n") and b"Content-Length: 0" in raw
        # Another SNI fails the handshake even though the certificate would cover it.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_request(relay.port, ctx, "/healthz", sni="other.test", host=DOMAIN)


async def test_without_domain_any_host_is_served(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN])
    ctx = client_context(ca.pem)
    async with start_tls_relay(f"--tls-cert={cert}", f"--tls-key={key}") as relay:
        status, _, _ = await tls_request(relay.port, ctx, "/healthz", host="anything.example")
        assert status == 200
        code, _ = await closed_with(await tls_phone(relay.port, ctx, "nobody"))
        assert code == 4404  # no binary for that server-id: the registry answers over TLS
