"""Readiness as a load balancer and systemd see it: `/readyz` on the main and metrics
listeners, and the notify protocol on a real datagram socket (`NOTIFY_SOCKET`)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

from pyrycode_relay.tools.bench.ports import free_port
from tests.certs import make_ca, write_leaf
from tests.e2e.clusterharness import redis_server, start_cluster
from tests.e2e.harness import RawWs, http_request, start_relay
from tests.e2e.tlsharness import DOMAIN, start_tls_relay


@contextlib.contextmanager
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A datagram socket standing in for systemd's, and the env that names it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


async def next_notification(sock: socket.socket, timeout: float = 5.0) -> dict[str, str]:
    """The next datagram, as its KEY=VALUE lines."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        data = await loop.sock_recv(sock, 4096)
    return dict(line.split("=", 1) for line in data.decode().split("\n") if line)


async def readyz(port: int) -> tuple[int, bytes]:
    status, headers, body = await http_request(port, "GET", "/readyz")
    assert headers["cache-control"] == "no-store"
    return status, body


async def wait_readyz(port: int, want: tuple[int, bytes], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while (got := await readyz(port)) != want:
            await asyncio.sleep(0.05)
    assert got == want


async def test_ready_notifies_systemd_and_readyz_drops_to_503_while_draining(
    tmp_path: Path,
) -> None:
    with notify_socket(tmp_path) as (sock, env):
        async with start_relay("--drain-timeout=3s", env=env) as relay:
            note = await next_notification(sock)
            assert note["READY"] == "1"
            assert note["STATUS"] == "serving insecure"
            assert await readyz(relay.port) == (200, b"ready\n")
            assert await readyz(relay.metrics_port) == (200, b"ready\n")
            # /healthz is untouched: the reference's body, five keys.
            assert set(await relay.healthz()) == {
                "status",
                "version",
                "connected_binaries",
                "connected_phones",
                "uptime_seconds",
            }

            # A peer that never answers the close frame keeps the drain going.
            await RawWs.connect(relay, "server", "s1")
            await relay.wait_counts(1, 0)
            relay.proc.send_signal(signal.SIGTERM)
            note = await next_notification(sock)
            assert (note["STOPPING"], note["STATUS"]) == ("1", "draining")
            # The main listener is closed; the metrics listener says why.
            assert await readyz(relay.metrics_port) == (503, b"not ready: draining\n")
            assert await relay.stop() == 0


async def test_acme_without_a_certificate_is_not_ready(tmp_path: Path) -> None:
    metrics = free_port()
    dead_directory = f"https://127.0.0.1:{free_port()}/dir"  # nothing listens: no certificate
    with notify_socket(tmp_path) as (sock, env):
        async with start_tls_relay(
            f"--domain={DOMAIN}",
            f"--http-listen=127.0.0.1:{free_port()}",
            f"--cert-cache={tmp_path / 'certs'}",
            f"--acme-directory={dead_directory}",
            f"--metrics-listen=127.0.0.1:{metrics}",
            env=env,
        ):
            note = await next_notification(sock)
            assert note["READY"] == "1"  # started: systemd must not wait on the CA
            assert note["STATUS"] == "serving autocert; not ready: certificate"
            assert await readyz(metrics) == (503, b"not ready: certificate\n")


async def test_static_tls_reload_tells_systemd_reloading_then_ready(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN])
    metrics = free_port()
    with notify_socket(tmp_path) as (sock, env):
        async with start_tls_relay(
            f"--tls-cert={cert}",
            f"--tls-key={key}",
            f"--metrics-listen=127.0.0.1:{metrics}",
            env=env,
        ) as relay:
            note = await next_notification(sock)
            assert (note["READY"], note["STATUS"]) == ("1", "serving static-tls")
            assert await readyz(metrics) == (200, b"ready\n")
            relay.proc.send_signal(signal.SIGHUP)
            note = await next_notification(sock)
            assert note["RELOADING"] == "1"
            assert int(note["MONOTONIC_USEC"]) > 0
            note = await next_notification(sock)
            assert note["READY"] == "1"
            await relay.wait_log("tls certificate reloaded")


async def test_cluster_is_not_ready_while_redis_is_unreachable(tmp_path: Path) -> None:
    with notify_socket(tmp_path) as (sock, env):
        async with redis_server() as redis, start_cluster(redis, 1, env=env) as cluster:
            [relay] = cluster.relays
            await cluster.wait_ready()
            await wait_readyz(relay.port, (200, b"ready\n"))
            note = await next_notification(sock)
            assert note["READY"] == "1"
            if note["STATUS"] != "serving insecure":  # READY came before the bus was up
                assert await next_notification(sock) == {"STATUS": "serving insecure"}
            await redis.stop()
            await wait_readyz(relay.port, (503, b"not ready: redis\n"))
            # systemd's STATUS line follows readiness, both ways.
            note = await next_notification(sock)
            assert note == {"STATUS": "serving insecure; not ready: redis"}
            await redis.start()
            await wait_readyz(relay.port, (200, b"ready\n"), timeout=10)
            assert await next_notification(sock) == {"STATUS": "serving insecure"}
