"""ACME autocert against a real ACME server (Debian's `pebble`) on loopback, plus §15
scenarios 67 (Host gate), 68 (port 80) and 83 (cert cache directory matrix)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyrycode_relay.tools.bench.ports import free_port
from tests.certs import make_ca, write_leaf
from tests.e2e.harness import recv_json, relay_env, run_relay
from tests.e2e.tlsharness import (
    DOMAIN,
    plain_request,
    serial_of,
    start_tls_relay,
    tls_binary,
    tls_phone,
    tls_request,
)

PEBBLE = shutil.which("pebble")
VALIDITY = 12  # seconds: renewal (a third of the lifetime left) happens 8 s after issue


@dataclass
class Pebble:
    directory: str
    ca_bundle: Path  # trusts pebble's own HTTPS API
    root_pem: bytes  # pebble's issuing root, fetched from its management API


@contextlib.asynccontextmanager
async def pebble(tmp_path: Path, http_port: int) -> AsyncIterator[Pebble]:
    """Pebble on loopback, validating http-01 against `http_port` (the relay's)."""
    assert PEBBLE is not None, "pebble is missing: scripts/test.sh installs it"
    ca = make_ca("pebble API test CA")
    cert, key, _ = write_leaf(ca, tmp_path, "pebble-api", ["localhost", "127.0.0.1"])
    bundle = tmp_path / "pebble-api-ca.pem"
    bundle.write_bytes(ca.pem)
    api, mgmt = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{api}",
            "managementListenAddress": f"127.0.0.1:{mgmt}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": VALIDITY,
        }
    }
    config_path = tmp_path / "pebble.json"
    config_path.write_text(json.dumps(config))
    env = relay_env({"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"})
    proc = await asyncio.create_subprocess_exec(
        PEBBLE,
        "-config",
        str(config_path),
        "-strict=false",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        ctx = ssl.create_default_context(cafile=str(bundle))
        async with asyncio.timeout(10):
            while True:  # pebble is up when its management API answers
                try:
                    status, raw, _ = await tls_request(mgmt, ctx, "/roots/0", sni="localhost")
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                assert status == 200
                break
        root = raw.split(b"\r\n\r\n", 1)[1]
        assert root.startswith(b"-----BEGIN CERTIFICATE-----")
        yield Pebble(f"https://127.0.0.1:{api}/dir", bundle, root)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


def acme_flags(p: Pebble, cache: Path, http_port: int) -> list[str]:
    return [
        f"--domain={DOMAIN}",
        f"--http-listen=127.0.0.1:{http_port}",
        f"--cert-cache={cache}",
        f"--acme-directory={p.directory}",
        f"--acme-ca-bundle={p.ca_bundle}",
        "--acme-email=ops@example.org",
    ]


def serial_in(line: str) -> int:
    return int(line.split("serial=", 1)[1].split(maxsplit=1)[0], 16)


async def test_obtains_a_certificate_and_serves_websockets_host_gate_and_port_80(
    tmp_path: Path,
) -> None:
    http_port = free_port()
    cache = tmp_path / "certs"
    async with pebble(tmp_path, http_port) as p:
        flags = acme_flags(p, cache, http_port)
        async with start_tls_relay(*flags, ready="acme certificate obtained") as relay:
            serial = serial_in(await relay.wait_log("acme certificate obtained"))
            ctx = ssl.create_default_context(cadata=p.root_pem.decode())

            b = await tls_binary(relay.port, ctx, "s1")
            ph = await tls_phone(relay.port, ctx, "s1")
            assert serial_of(b) == serial
            await ph.send('{"hello":1}')
            env = await recv_json(b)
            assert env["frame"] == {"hello": 1}
            await b.send(json.dumps({"conn_id": env["conn_id"], "frame": {"ok": True}}))
            assert await recv_json(ph) == {"ok": True}

            # §15.67: another Host → 421 with no body, /healthz included.
            status, raw, _ = await tls_request(relay.port, ctx, "/healthz", host="evil.example")
            assert status == 421 and raw.endswith(b"\r\n\r\n")
            assert (await tls_request(relay.port, ctx, "/healthz"))[0] == 200
            # Only the domain is served: another SNI fails the handshake.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_request(relay.port, ctx, "/healthz", sni="other.localhost")

            # §15.68: port 80 answers ACME challenges only; 404 otherwise, never a redirect.
            status, raw = await plain_request(http_port, "/", DOMAIN)
            assert status == 404 and b"Location" not in raw
            status, _ = await plain_request(http_port, "/.well-known/acme-challenge/nope", DOMAIN)
            assert status == 404
            status, _ = await plain_request(http_port, "/.well-known/acme-challenge/x", "evil")
            assert status == 403

            # The cache holds the account and the certificate, all private.
            assert stat.S_IMODE(cache.stat().st_mode) == 0o700
            files = sorted(f.name for f in cache.iterdir())
            assert files == ["acme_account.key", f"{DOMAIN}.crt", f"{DOMAIN}.key"]
            for f in cache.iterdir():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600
            await ph.close()
            await b.close()
            assert await relay.stop() == 0


def acme_lines(relay_lines: list[str]) -> list[str]:
    """The ACME progress lines, as `msg … key=value` (time and level dropped)."""
    return [x.split(" msg=", 1)[1] for x in relay_lines if ' msg="acme ' in x]


async def test_progress_is_logged_step_by_step(tmp_path: Path) -> None:
    http_port = free_port()
    async with pebble(tmp_path, http_port) as p:
        flags = acme_flags(p, tmp_path / "certs", http_port)
        async with start_tls_relay(*flags, ready="acme certificate obtained") as relay:
            assert await relay.stop() == 0
    lines = acme_lines(relay.lines)
    d = f"domain={DOMAIN}"
    assert lines[0] == f'"acme order created" {d}'
    assert lines[1] == f'"acme challenge served, waiting for validation" {d} challenge=http-01'
    # pebble's validation authority fetches the token once; the line names where from
    fetched = [x for x in lines if x.startswith('"acme challenge fetched"')]
    assert fetched and all(
        x == f'"acme challenge fetched" {d} challenge=http-01 remote=127.0.0.1' for x in fetched
    )
    rest = [x for x in lines[2:] if x not in fetched]
    assert rest[:2] == [
        f'"acme challenge validated" {d} challenge=http-01',
        f'"acme order finalizing" {d}',
    ]
    assert rest[2].startswith(f'"acme certificate obtained" {d} serial=')
    assert len(rest) == 3, lines
    assert all(" level=INFO " in x for x in relay.lines if ' msg="acme ' in x)


async def test_a_failed_challenge_is_logged_whole(tmp_path: Path) -> None:
    # pebble validates against a port where nothing listens: the challenge fails, and the
    # reason (on the second line of acme's error) reaches the log.
    http_port = free_port()
    async with pebble(tmp_path, free_port()) as p:
        flags = acme_flags(p, tmp_path / "certs", http_port)
        async with start_tls_relay(*flags) as relay:
            line = await relay.wait_log("acme certificate request failed", timeout=30)
    err = line.split(' err="', 1)[1].rsplit('" retry_ms=', 1)[0]
    assert err.startswith(f"ValidationError: Authorization for {DOMAIN} failed"), err
    assert "Challenge http-01 failed with error urn:ietf:params:acme:error:connection" in err, err
    assert "…" not in err and "\\n" not in err
    assert line.endswith(" retry_ms=1000")


async def test_an_unreachable_directory_is_logged_whole(tmp_path: Path) -> None:
    flags = [
        f"--domain={DOMAIN}",
        f"--http-listen=127.0.0.1:{free_port()}",
        f"--cert-cache={tmp_path / 'certs'}",
        f"--acme-directory=https://127.0.0.1:{free_port()}/dir",
    ]
    async with start_tls_relay(*flags) as relay:
        line = await relay.wait_log("acme certificate request failed", timeout=10)
    err = line.split(' err="', 1)[1].rsplit('" retry_ms=', 1)[0]
    # The whole text (it used to be cut after 200 characters, mid-word), in the words of
    # the acme release installed: requests' with acme 5, acme's own before.
    assert "127.0.0.1" in err and "Connection refused" in err, err
    assert "…" not in err


async def test_renewal_swaps_the_certificate_on_a_live_listener(tmp_path: Path) -> None:
    http_port = free_port()
    async with pebble(tmp_path, http_port) as p:
        flags = acme_flags(p, tmp_path / "certs", http_port)
        async with start_tls_relay(*flags, ready="acme certificate obtained") as relay:
            first = serial_in(await relay.wait_log("acme certificate obtained"))
            ctx = ssl.create_default_context(cadata=p.root_pem.decode())
            b = await tls_binary(relay.port, ctx, "s1")
            ph = await tls_phone(relay.port, ctx, "s1")
            assert serial_of(ph) == first
            async with asyncio.timeout(VALIDITY + 10):
                while relay.count_log("acme certificate obtained") < 2:
                    await relay.wait_log("acme certificate obtained")
                    await asyncio.sleep(0.05)
            second = serial_in(
                [line for line in relay.lines if "acme certificate obtained" in line][1]
            )
            assert second != first
            fresh = await tls_phone(relay.port, ctx, "s1")
            assert serial_of(fresh) == second
            # The WebSockets from before the renewal still route both ways.
            await ph.send('{"n":1}')
            env = await recv_json(b)
            await b.send(json.dumps({"conn_id": env["conn_id"], "frame": {"r": 1}}))
            assert await recv_json(ph) == {"r": 1}
            for ws in (fresh, ph, b):
                await ws.close()


# -- §15.83: the cert cache directory matrix (no ACME server needed: refusals happen
# before it is contacted, and accepted cases are checked at `starting`) --------------


async def boot_with_cache(cache: Path) -> str:
    """Start the relay in ACME mode against an unreachable ACME directory, stop it once it
    serves, and return its log (the cache policy ran before `starting`)."""
    flags = [
        f"--domain={DOMAIN}",
        f"--http-listen=127.0.0.1:{free_port()}",
        f"--cert-cache={cache}",
        f"--acme-directory=https://127.0.0.1:{free_port()}/dir",
    ]
    async with start_tls_relay(*flags) as relay:
        assert await relay.stop() == 0
        return relay.log


async def test_sighup_is_logged_once_and_never_fatal(tmp_path: Path) -> None:
    # Nothing to reload in ACME mode (renewal is the relay's own): one line, and it serves on.
    http_port = free_port()
    flags = [
        f"--domain={DOMAIN}",
        f"--http-listen=127.0.0.1:{http_port}",
        f"--cert-cache={tmp_path / 'certs'}",
        f"--acme-directory=https://127.0.0.1:{free_port()}/dir",
    ]
    async with start_tls_relay(*flags) as relay:
        relay.proc.send_signal(signal.SIGHUP)
        line = await relay.wait_log("reload signal received")
        assert "signal=SIGHUP mode=autocert" in line
        status, _ = await plain_request(http_port, "/", DOMAIN)  # still serving
        assert status == 404
        assert await relay.stop() == 0
        assert relay.count_log("reload signal received") == 1


async def test_cache_missing_is_created_0700(tmp_path: Path) -> None:
    cache = tmp_path / "deep" / "certs"
    log = await boot_with_cache(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert "tightened" not in log


async def test_cache_own_0755_is_tightened_and_logged(tmp_path: Path) -> None:
    cache = tmp_path / "certs"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    log = await boot_with_cache(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    line = next(x for x in log.splitlines() if "tightened cert cache dir perms" in x)
    assert f"path={cache}" in line and "from=0755" in line and "to=0700" in line


async def refused(cache: Path) -> str:
    code, out = await run_relay(
        f"--https-listen=127.0.0.1:{free_port()}",
        f"--http-listen=127.0.0.1:{free_port()}",
        f"--domain={DOMAIN}",
        f"--cert-cache={cache}",
        "--metrics-listen=",
    )
    assert code == 1, out
    return out


async def test_cache_other_owned_0755_exits_1(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root; this case needs chown")
        pytest.skip("needs root to give the directory to another uid")
    cache = tmp_path / "certs"
    cache.mkdir()
    cache.chmod(0o755)
    os.chown(cache, 65534, 65534)
    out = await refused(cache)
    assert "cert cache dir has insecure permissions (must be 0700)" in out
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755  # left alone


async def test_cache_path_that_is_a_file_exits_1(tmp_path: Path) -> None:
    cache = tmp_path / "certs"
    cache.write_text("not a directory")
    out = await refused(cache)
    assert "is not a directory" in out
