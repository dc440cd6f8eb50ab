"""Conformance §15 scenario 69: the HTTPS listener with --https-proxy-protocol."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest

from pyrycode_relay.tls.proxy import SIGNATURE
from tests.certs import CA, make_ca, write_leaf
from tests.e2e.harness import Relay
from tests.e2e.tlsharness import DOMAIN, client_context, start_tls_relay, tls_request
from tests.proxyv2 import CMD_LOCAL, build_proxy_v2

HANDSHAKE = 2.0  # --handshake-timeout in FAST_TIMERS


def v4(source: str) -> bytes:
    return build_proxy_v2((source, 40000), ("10.0.0.1", 443))


def proxy_relay(tmp_path: Path, *flags: str) -> tuple[CA, list[str]]:
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN])
    return ca, [
        f"--tls-cert={cert}",
        f"--tls-key={key}",
        "--https-proxy-protocol",
        "--rate-limit-burst=2",
        "--rate-limit-interval=1h",
        *flags,
    ]


async def upgrade_status(relay: Relay, ctx: ssl.SSLContext, header: bytes) -> int:
    """A header-gate-failing upgrade attempt (counts against the rate limit) behind `header`."""
    status, _, _ = await tls_request(relay.port, ctx, "/v1/server", prefix=header)
    return status


async def unserved(port: int, first: bytes, timeout: float = HANDSHAKE + 2) -> float:
    """Sends `first`, then reads until the relay closes: asserts zero bytes came back and
    returns how long the close took."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if first:
            writer.write(first)
        async with asyncio.timeout(timeout):
            try:
                data = await reader.read()
            except ConnectionResetError:
                data = b""
    finally:
        writer.close()
    assert data == b""
    return time.monotonic() - start


async def test_v4_and_v6_sources_get_their_own_rate_limit_buckets(tmp_path: Path) -> None:
    ca, flags = proxy_relay(tmp_path)
    ctx = client_context(ca.pem)
    async with start_tls_relay(*flags) as relay:
        a, b = v4("203.0.113.7"), build_proxy_v2(("2001:db8::7", 5), ("2001:db8::1", 443))
        assert [await upgrade_status(relay, ctx, a) for _ in range(3)] == [400, 400, 429]
        assert await upgrade_status(relay, ctx, b) == 400  # another client: its own bucket
        assert [await upgrade_status(relay, ctx, b) for _ in range(2)] == [400, 429]
        assert await upgrade_status(relay, ctx, v4("198.51.100.9")) == 400
        limited = [line for line in relay.lines if "msg=rate_limited" in line]
        assert [line.split("remote=", 1)[1] for line in limited] == [
            '"\\"203.0.113.7\\""',
            '"\\"2001:db8::7\\""',
        ]


BAD_HEADERS = {
    "headerless plain request": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "v1": b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n",
    "LOCAL": SIGNATURE + bytes([0x20 | CMD_LOCAL, 0x11]) + struct.pack("!H", 12) + bytes(12),
    "UNSPEC": SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0),
    "garbage": b"\x00\xffgarbage\r\n\r\n",
}


@pytest.mark.parametrize("first", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
async def test_bad_headers_are_closed_with_zero_bytes(tmp_path: Path, first: bytes) -> None:
    _ca, flags = proxy_relay(tmp_path)
    async with start_tls_relay(*flags) as relay:
        assert await unserved(relay.port, first) < HANDSHAKE / 2  # refused at once
        assert "internal error" not in relay.log


async def test_a_silent_or_late_peer_is_closed_and_does_not_delay_others(tmp_path: Path) -> None:
    ca, flags = proxy_relay(tmp_path)
    ctx = client_context(ca.pem)
    async with start_tls_relay(*flags) as relay:
        silent = asyncio.create_task(unserved(relay.port, b""))
        partial = asyncio.create_task(unserved(relay.port, v4("192.0.2.1")[:20]))
        await asyncio.sleep(0.1)  # both are connected and stalled before the good one starts
        start = time.monotonic()
        status, _, _ = await tls_request(relay.port, ctx, "/healthz", prefix=v4("192.0.2.2"))
        assert status == 200
        assert time.monotonic() - start < HANDSHAKE / 2
        for task in (silent, partial):
            assert HANDSHAKE * 0.8 < await task < HANDSHAKE + 1.5


async def test_header_and_client_hello_in_one_segment_still_handshake(tmp_path: Path) -> None:
    ca, flags = proxy_relay(tmp_path)
    ctx = client_context(ca.pem)
    async with start_tls_relay(*flags) as relay:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname=DOMAIN)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        sock = socket.create_connection(("127.0.0.1", relay.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5)
        loop = asyncio.get_running_loop()
        try:
            sock.sendall(v4("192.0.2.3") + hello)  # one write, one loopback segment
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                if outgoing.pending:
                    await loop.sock_sendall(sock, outgoing.read())
                data = await asyncio.to_thread(sock.recv, 65536)
                assert data, "the relay closed during the handshake"
                incoming.write(data)
            tls.write(f"GET /healthz HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
            await asyncio.to_thread(sock.sendall, outgoing.read())
            reply = b""
            while b"\r\n\r\n" not in reply:
                incoming.write(await asyncio.to_thread(sock.recv, 65536))
                try:
                    reply += tls.read(65536)
                except ssl.SSLWantReadError:
                    continue
            assert reply.startswith(b"HTTP/1.1 200 ")
        finally:
            sock.close()


async def test_allowlist_refuses_other_peers_unserved(tmp_path: Path) -> None:
    ca, flags = proxy_relay(tmp_path, "--proxy-protocol-allow=10.0.0.0/8, 192.0.2.0/24")
    async with start_tls_relay(*flags) as relay:
        assert await unserved(relay.port, v4("203.0.113.7")) < HANDSHAKE / 2
    ca, flags = proxy_relay(tmp_path, "--proxy-protocol-allow=127.0.0.0/8")
    ctx = client_context(ca.pem)
    async with start_tls_relay(*flags) as relay:
        status, _, _ = await tls_request(relay.port, ctx, "/healthz", prefix=v4("203.0.113.7"))
        assert status == 200
