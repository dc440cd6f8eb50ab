"""The relay process from start-up to exit: one owner for its whole lifecycle.

Owns: building what serves (the push sender, the `Relay`, the cluster placement, the TLS front
end), opening every listener, readiness (`/readyz` and the systemd notifications: READY once
serving, RELOADING around a certificate reload, STOPPING at the drain), the signals (SIGTERM
and SIGINT start the drain, a second one is ignored; SIGHUP reloads a static certificate and
is otherwise logged and ignored, never fatal), the periodic rate-limiter sweep, the bounded
drain (every WebSocket closed 1001 `shutting down` within --drain-timeout; the metrics
listener, with its `/readyz`, closes last), and the exit code. Everything started is undone
on one `AsyncExitStack`, in reverse order, however start-up or serving ends.
Must never: validate flags (ops.boot did) or touch frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pyrycode_relay.core.addresses import ListenAddress, Listeners
from pyrycode_relay.core.config import Config
from pyrycode_relay.endpoints.relay import Relay
from pyrycode_relay.endpoints.router import MainRouter, MetricsRouter
from pyrycode_relay.ops import logbridge
from pyrycode_relay.ops.boot import ENV_FCM_CREDENTIALS, MSG_ENV, REASON_FCM_CREDENTIALS
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.metrics import BuildInfo, MetricsExporter
from pyrycode_relay.ops.push import PushSender
from pyrycode_relay.ops.readiness import Readiness
from pyrycode_relay.ops.refusal import ExitCode, Refusal
from pyrycode_relay.ops.sdnotify import SystemdNotifier
from pyrycode_relay.transport.connection import Connection, ConnSettings, Listener, listen

if TYPE_CHECKING:
    from pyrycode_relay.cluster.placement import ClusterPlacement
    from pyrycode_relay.tls.mode import TlsFrontEnd

RATE_LIMIT_SWEEP_SECONDS = 300.0  # reference §8.3
STATUS_POLL_SECONDS = 1.0  # how soon systemd's STATUS line follows readiness


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


class ListenerFailed(Exception):
    """A listener could not be opened (exit 1, like the reference)."""

    def __init__(self, address: str, err: str) -> None:
        super().__init__(address, err)
        self.address = address
        self.err = err


class RelayServer:
    """One relay process's start-up, serving and shutdown.

    Concurrency: everything runs on the event loop's thread; `run` is awaited once, and
    signal handlers only set the stop event or schedule a reload task.
    """

    def __init__(
        self,
        config: Config,
        listeners: Listeners,
        log: Logger,
        version: str,
        fcm_credentials: str | None = None,
        *,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self.listeners = listeners  # parsed by the boot checks
        self.log = log
        self.version = version
        self._fcm_credentials = fcm_credentials
        self._notify = notifier or SystemdNotifier({})
        self.readiness = Readiness()
        self._stop = asyncio.Event()
        self._tls: TlsFrontEnd | None = None
        self._cluster: ClusterPlacement | None = None
        self._metrics_listener: Listener | None = None

    async def run(self) -> ExitCode:
        """Serve until SIGTERM/SIGINT, then drain. A refusal or a listener that cannot be
        opened ends start-up with its exit code, after everything started is undone."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(logbridge.loop_exception_handler(self.log))
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self._start(stack)
            except Refusal as refusal:
                refusal.log(self.log)
                return refusal.exit_code
            except ListenerFailed as failed:
                self.log.error("listener failed", addr=failed.address, err=failed.err)
                self.log.error("listener error; draining")
                return ExitCode.RUNTIME
            status = self._status()
            self._notify.ready(status)
            stop_watching = self._watch_status(status)
            await self._stop.wait()
            stop_watching()
            self._notify.stopping()
            self.log.info("shutdown signal received; draining")
            # Leaving the block stops the TLS tasks and the sweeper, drains, hands this
            # instance's ids back to the cluster and closes the push sender, in that order.
        return ExitCode.OK

    # -- start-up: each step pushes its own undo --------------------------------------

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        config, log = self.config, self.log
        # First, so that removing them is the very last undo: a signal at any moment from
        # here to the end (a slow cluster start, the drain, handing ids back) is ours, and a
        # second SIGTERM or a SIGHUP never falls to the default handler that ends the process.
        self._handle_signals(stack)
        relay = Relay(config, log, self.version, self._push_sender())
        # Last to run: after the drain, as the reference does; cancels in-flight sends.
        stack.push_async_callback(relay.push.close)
        if config.cluster_redis:
            # Imported here: a single instance never loads the Redis client.
            from pyrycode_relay.cluster.placement import ClusterPlacement

            cluster = ClusterPlacement(relay)
            relay.placement = cluster
            await cluster.start()  # before any listener: nothing is admitted half-ready
            self._cluster = cluster
            self.readiness.require("redis", lambda: cluster.bus.up)
        stack.push_async_callback(relay.placement.stop)  # hands our ids back
        if not config.insecure_listen:
            # Imported here: insecure mode never loads TLS, `cryptography` or `acme`.
            from pyrycode_relay.tls.mode import TlsFrontEnd, TlsSettings

            tls_settings = TlsSettings.from_config(config)
            tls = TlsFrontEnd(tls_settings, self.listeners, log, self.version)
            tls.prepare()
            self._tls = tls
            self.readiness.require("certificate", lambda: tls.has_certificate)
        live = LiveConnections()
        servers = await self._open_listeners(relay, live)
        stack.push_async_callback(self._drain, relay, servers, live)
        self.readiness.listening()
        if self._tls is not None:
            self._tls.start()
            stack.callback(self._tls.close)
        # Rate-limiter buckets idle past their refill are dropped (reference §8.3).
        stack.callback(self._every(RATE_LIMIT_SWEEP_SECONDS, relay.limiter.sweep))
        if not relay.push.enabled:
            log.info("push off: PYRYCODE_RELAY_FCM_CREDENTIALS unset")
        log.record("info", "starting", self._starting_fields())

    def _push_sender(self) -> PushSender | None:
        if self._fcm_credentials is None:
            return None
        # Imported here: only a relay with push on loads google-auth, httpx and cryptography.
        from pyrycode_relay.ops.fcm import build_sender

        try:
            return build_sender(self._fcm_credentials, self.config.fcm_endpoint)
        except ValueError:
            # Reference §9.3 step 10; ops.boot already validated the key, so not expected.
            raise Refusal(
                MSG_ENV, {"env_var": ENV_FCM_CREDENTIALS, "reason": REASON_FCM_CREDENTIALS}
            ) from None

    def _handle_signals(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self._stop.set,  # a second one finds the event set: ignored
            signal.SIGINT: self._stop.set,
            signal.SIGHUP: self._on_hangup,
        }
        for signum, handler in handlers.items():
            loop.add_signal_handler(signum, handler)
            stack.callback(loop.remove_signal_handler, signum)

    def _on_hangup(self) -> None:
        tls = self._tls
        if tls is not None and tls.static:
            self._notify.reloading()
            tls.reload().add_done_callback(lambda _: self._notify.ready(self._status()))
            return
        # Like nginx or Caddy, SIGHUP means "reload"; no other mode has a file to reload.
        self.log.info("reload signal received; nothing to reload", signal="SIGHUP", mode=self.mode)

    def _status(self) -> str:
        """The service manager's STATUS line."""
        ready, text = self.readiness.verdict()
        return f"serving {self.mode}" if ready else f"serving {self.mode}; {text}"

    @property
    def mode(self) -> str:
        """The mode the boot checks chose, known from the first moment (a SIGHUP may come
        before the TLS front end exists)."""
        config = self.config
        if config.insecure_listen:
            return "insecure"
        return "static-tls" if config.tls_cert else "autocert"

    async def _open_listeners(self, relay: Relay, live: LiveConnections) -> list[Listener]:
        """Every listener, in bind order; on a failure the ones already open are closed."""
        config = self.config
        settings = ConnSettings.from_config(config)
        openers: list[tuple[ListenAddress, Callable[[], Awaitable[Listener]]]] = []
        router = MainRouter(relay, self.readiness)
        if self._tls is None:
            address = self.listeners.main
            openers.append((address, lambda: listen(address, router, settings, live)))
        else:
            openers.extend(self._tls.listeners(router, settings, live))
        metrics_address = self.listeners.metrics
        if metrics_address is not None:
            exporter = MetricsExporter(
                relay.stats,
                relay.placement.counts,
                lambda: relay.budget.used,
                relay.push.outcomes if relay.push.enabled else None,
                build=BuildInfo.current(self.version, relay.loop),
                tasks=lambda: len(asyncio.all_tasks()),
                cluster=None if self._cluster is None else self._cluster.figures,
                cert_not_after=None if self._tls is None else self._tls.not_after,
            )
            metrics = MetricsRouter(exporter, self.readiness)

            async def open_metrics() -> Listener:
                self.log.info("starting metrics listener", addr=metrics_address.text)
                self._metrics_listener = await listen(metrics_address, metrics, settings, live)
                return self._metrics_listener

            openers.append((metrics_address, open_metrics))
        servers: list[Listener] = []
        for address, open_listener in openers:
            try:
                servers.append(await open_listener())
            except OSError as exc:
                for server in servers:
                    server.close()
                raise ListenerFailed(address.text, exc.strerror or type(exc).__name__) from None
        return servers

    def _every(self, seconds: float, tick: Callable[[], object]) -> Callable[[], None]:
        """Call `tick` every `seconds` on the loop; returns what stops it."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def run() -> None:
            nonlocal handle
            tick()
            handle = loop.call_later(seconds, run)

        def stop() -> None:
            handle.cancel()  # whichever handle is current by then

        handle = loop.call_later(seconds, run)
        return stop

    def _watch_status(self, sent: str) -> Callable[[], None]:
        """Tell the service manager when the STATUS line changes (a certificate arrives,
        Redis goes or comes back); returns what stops it. Nothing without NOTIFY_SOCKET."""
        if not self._notify.enabled:
            return lambda: None
        last = sent

        def check() -> None:
            nonlocal last
            status = self._status()
            if status != last:
                last = status
                self._notify.status(status)

        return self._every(STATUS_POLL_SECONDS, check)

    def _starting_fields(self) -> dict[str, object]:
        config = self.config
        fields: dict[str, object] = {
            "version": self.version,
            "mode": self.mode,
            "listen": self.listeners.main.text,
        }
        if self._tls is not None:
            fields["domain"] = config.domain
            fields["https_proxy_protocol"] = config.https_proxy_protocol
        if self._cluster is not None:
            fields["cluster"] = self._cluster.me
        return fields

    # -- shutdown ---------------------------------------------------------------------

    async def _drain(self, relay: Relay, servers: list[Listener], live: LiveConnections) -> None:
        """Refuse new connections, close every WebSocket 1001, wait up to --drain-timeout.
        The metrics listener stays open to the end, so /readyz says 503 while draining."""
        relay.shutting_down = True
        self.readiness.draining = True
        for server in servers:
            if server is not self._metrics_listener:
                server.close()
        for conn in list(live):
            handler = conn.handler
            if handler is None:
                conn.abort()  # still reading a request head: nothing to say goodbye to
            else:
                handler.shutdown()
        try:
            await asyncio.wait_for(live.wait_empty(), self.config.drain_timeout)
        except TimeoutError:
            for conn in list(live):
                conn.abort()
            self.log.warn("shutdown deadline exceeded; force-closed listeners")
            self.log.warn("drain incomplete")
            return
        finally:
            if self._metrics_listener is not None:
                self._metrics_listener.close()
        self.log.info("shutdown complete")
