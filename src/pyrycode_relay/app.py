"""The relay's lifecycle: listeners up, serve until a signal, then a bounded drain.

Owns: binding the main and metrics listeners, building the push sender when
PYRYCODE_RELAY_FCM_CREDENTIALS is set, the periodic rate-limiter sweep, signal
handling (SIGTERM/SIGINT start the drain; a second signal is ignored), closing every
WebSocket with 1001 `shutting down` within --drain-timeout, and the exit code
(0 after a signal, 1 when a listener fails), then closing the push waker (in-flight sends
are cancelled).
Must never: validate configuration (ops.boot did) or touch frames.
"""

from __future__ import annotations

import asyncio
import signal
from functools import partial
from typing import TYPE_CHECKING

from pyrycode_relay.core.config import Config
from pyrycode_relay.endpoints.relay import Relay
from pyrycode_relay.endpoints.router import MainRouter, MetricsRouter
from pyrycode_relay.ops.boot import (
    ENV_FCM_CREDENTIALS,
    EXIT_CONFIG_REFUSED,
    REASON_FCM_CREDENTIALS,
    BootRefusal,
    parse_listen_address,
)
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.metrics import MetricsExporter
from pyrycode_relay.ops.push import build_sender
from pyrycode_relay.tlsmode import Listener, TlsFrontEnd, TlsRefusal
from pyrycode_relay.transport.connection import Connection, ConnSettings, Router

if TYPE_CHECKING:
    from pyrycode_relay.cluster.placement import ClusterPlacement

RATE_LIMIT_SWEEP_SECONDS = 300.0  # reference §8.3


class LiveConnections(set[Connection]):
    """Every open TCP connection; the drain waits for it to empty."""

    def __init__(self) -> None:
        super().__init__()
        self._empty: asyncio.Event | None = None

    def discard(self, conn: object) -> None:
        super().discard(conn)
        if not self and self._empty is not None:
            self._empty.set()

    async def wait_empty(self) -> None:
        if self:
            self._empty = asyncio.Event()
            await self._empty.wait()


def _internal_error(log: Logger, _loop: object, context: dict[str, object]) -> None:
    """A bug in a callback: one allowlisted line (the exception type only — its text or a
    traceback could carry peer data), instead of asyncio's default traceback dump."""
    exc = context.get("exception")
    log.error("internal error", err=type(exc).__name__ if exc is not None else "unknown")


async def _listen(
    address: str, router: Router, settings: ConnSettings, live: LiveConnections
) -> asyncio.Server:
    host, port = parse_listen_address(address)
    loop = asyncio.get_running_loop()

    def factory() -> Connection:
        return Connection(router, settings, live)

    return await loop.create_server(factory, host or None, port, backlog=4096)


async def serve(
    config: Config, log: Logger, version: str, fcm_credentials: str | None = None
) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(partial(_internal_error, log))
    push_sender = None
    if fcm_credentials is not None:
        # Reference §9.3 step 10; ops.boot already validated the key, so this is not expected.
        try:
            push_sender = build_sender(fcm_credentials, config.fcm_endpoint)
        except ValueError:
            log.error(
                "refusing to start: invalid env-var config",
                env_var=ENV_FCM_CREDENTIALS,
                reason=REASON_FCM_CREDENTIALS,
            )
            return EXIT_CONFIG_REFUSED
    relay = Relay(config, log, version, push_sender)
    cluster: ClusterPlacement | None = None
    if config.cluster_redis:
        # Imported here: single instance never loads the Redis client.
        from pyrycode_relay.cluster import placement as cluster_placement

        cluster = cluster_placement.ClusterPlacement(relay)
        relay.placement = cluster
        try:
            await cluster.start()  # before any listener: nothing is admitted half-ready
        except BootRefusal as refusal:
            log.record("error", refusal.msg, refusal.fields)
            await relay.push.close()
            return refusal.exit_code
    settings = ConnSettings.from_config(config)
    live = LiveConnections()
    servers: list[Listener] = []
    tls: TlsFrontEnd | None = None
    if not config.insecure_listen:
        tls = TlsFrontEnd(config, log, version)
        try:
            tls.prepare()
        except TlsRefusal as refusal:
            await relay.placement.stop()
            return refusal.exit_code
    address = config.insecure_listen
    try:
        if tls is None:
            servers.append(await _listen(address, MainRouter(relay), settings, live))
        else:
            for address, open_listener in tls.listeners(relay, settings, live):  # noqa: B007
                servers.append(await open_listener())  # `address` names a bind failure
        if config.metrics_listen:
            address = config.metrics_listen
            log.info("starting metrics listener", addr=address)
            exporter = MetricsExporter(
                relay.stats,
                relay.placement.counts,
                lambda: relay.budget.used,
                relay.push.outcomes if relay.push.enabled else None,
                tasks=lambda: len(asyncio.all_tasks(loop)),
                cluster=None if cluster is None else cluster.figures,
            )
            servers.append(await _listen(address, MetricsRouter(exporter), settings, live))
    except OSError as exc:
        log.error("listener failed", addr=address, err=exc.strerror or type(exc).__name__)
        log.error("listener error; draining")
        for server in servers:
            server.close()
        await relay.placement.stop()
        await relay.push.close()
        return 1

    # Signal handlers go in before `starting` is logged: whoever waits for that line may
    # signal at once, and before the handler exists SIGTERM would kill the process
    # (exit -15) instead of draining it.
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if not relay.push.enabled:
        log.info("push off: PYRYCODE_RELAY_FCM_CREDENTIALS unset")
    starting: dict[str, object]
    if tls is None:
        starting = {"version": version, "mode": "insecure", "listen": config.insecure_listen}
    else:
        tls.start()  # before `starting`: a SIGHUP sent on seeing that line must be handled
        starting = {
            "version": version,
            "mode": tls.mode,
            "listen": config.https_listen,
            "domain": config.domain,
            "https_proxy_protocol": config.https_proxy_protocol,
        }
    if cluster is not None:
        starting["cluster"] = cluster.me
    log.record("info", "starting", starting)  # keys still checked against the allowlist

    sweeper: asyncio.TimerHandle

    def sweep() -> None:
        nonlocal sweeper
        relay.limiter.sweep()
        sweeper = loop.call_later(RATE_LIMIT_SWEEP_SECONDS, sweep)

    sweeper = loop.call_later(RATE_LIMIT_SWEEP_SECONDS, sweep)

    await stop.wait()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: None)  # a second signal is ignored
    sweeper.cancel()
    if tls is not None:
        tls.close()

    log.info("shutdown signal received; draining")
    await drain(relay, servers, live, log)
    await relay.placement.stop()  # hands this instance's ids back to the cluster
    await relay.push.close()  # after the drain, as the reference does: cancels in-flight sends
    return 0


async def drain(relay: Relay, servers: list[Listener], live: LiveConnections, log: Logger) -> None:
    """Refuse new connections, close every WebSocket 1001, wait up to --drain-timeout."""
    relay.shutting_down = True
    for server in servers:
        server.close()
    for conn in list(live):
        handler = conn.handler
        if handler is None:
            conn.abort()  # still reading a request head: nothing to say goodbye to
        else:
            handler.shutdown()
    try:
        await asyncio.wait_for(live.wait_empty(), relay.config.drain_timeout)
    except TimeoutError:
        for conn in list(live):
            conn.abort()
        log.warn("shutdown deadline exceeded; force-closed listeners")
        log.warn("drain incomplete")
        return
    log.info("shutdown complete")
