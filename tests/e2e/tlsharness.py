"""TLS end-to-end helpers: the relay in a TLS mode, TLS WebSocket fakes, raw TLS and PROXY.

The relay runs exactly as in `harness.start_relay`, but with TLS flags instead of
--insecure-listen. Clients connect to 127.0.0.1 with the SNI and Host the test chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from pyrycode_relay.tools.bench.ports import free_port
from tests.e2e.harness import FAST_TIMERS, TOKEN, Relay, launch, relay_command

DOMAIN = "localhost"  # resolves to loopback everywhere, so pebble can reach port 80 too


@contextlib.asynccontextmanager
async def start_tls_relay(
    *flags: str,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    ready: str = "msg=starting ",
    timers: Sequence[str] = FAST_TIMERS,
) -> AsyncIterator[Relay]:
    """The relay with `--https-listen=127.0.0.1:<port>` plus `flags` (a TLS mode)."""
    port = port or free_port()
    args = [f"--https-listen=127.0.0.1:{port}", "--max-connections=200", "--metrics-listen="]
    args += [*timers, *flags]
    async with launch(relay_command(*args), port=port, env=env, ready=ready, timeout=15) as r:
        yield r


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    return ctx


async def tls_binary(
    port: int, ctx: ssl.SSLContext, server_id: str, **kwargs: Any
) -> ClientConnection:
    return await websockets.connect(
        f"wss://{DOMAIN}:{port}/v1/server",
        host="127.0.0.1",
        ssl=ctx,
        server_hostname=DOMAIN,
        additional_headers={"X-Pyrycode-Server": server_id, "X-Pyrycode-Version": "0.11.0"},
        user_agent_header="pyry/0.11.0",
        compression=None,
        proxy=None,
        **kwargs,
    )


async def tls_phone(
    port: int, ctx: ssl.SSLContext, server_id: str, **kwargs: Any
) -> ClientConnection:
    return await websockets.connect(
        f"wss://{DOMAIN}:{port}/v1/client",
        host="127.0.0.1",
        ssl=ctx,
        server_hostname=DOMAIN,
        additional_headers={"X-Pyrycode-Server": server_id, "X-Pyrycode-Token": TOKEN},
        user_agent_header="1.4.2",
        compression=None,
        proxy=None,
        **kwargs,
    )


def serial_of(ws: ClientConnection) -> int:
    """The serial number of the certificate the relay served on this connection."""
    sslobj = ws.transport.get_extra_info("ssl_object")
    assert sslobj is not None
    cert = sslobj.getpeercert()
    assert cert is not None
    return int(str(cert["serialNumber"]), 16)


async def tls_request(
    port: int,
    ctx: ssl.SSLContext,
    path: str,
    *,
    host: str = DOMAIN,
    sni: str = DOMAIN,
    prefix: bytes = b"",
) -> tuple[int, bytes, int]:
    """One HTTP/1.1 GET over TLS: (status, raw response, certificate serial). `prefix` is
    sent in the clear before the ClientHello (a PROXY header)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if prefix:
            writer.write(prefix)
            await writer.drain()
        await writer.start_tls(ctx, server_hostname=sni)
        sslobj = writer.get_extra_info("ssl_object")
        cert = sslobj.getpeercert()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
    return int(raw.split(b" ", 2)[1]), raw, int(str(cert["serialNumber"]), 16)


async def plain_request(port: int, path: str, host: str) -> tuple[int, bytes]:
    """One plain HTTP/1.1 GET (the port-80 listener)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
    return int(raw.split(b" ", 2)[1]), raw
