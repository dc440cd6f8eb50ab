"""The relay process from start-up to exit: one owner for its whole lifecycle.

Owns: building what serves (the push sender, the `Relay`, the cluster placement, the TLS front
end), opening every listener (or adopting a predecessor's, in a live handover), readiness
(`/readyz` and the systemd notifications: READY once serving, RELOADING around a certificate
reload, STOPPING at the drain, MAINPID in a handover), the signals (SIGTERM and SIGINT start
the drain, a second one is ignored; SIGHUP reloads a static certificate and is otherwise
logged and ignored, never fatal; SIGUSR2 hands everything to a successor process: handover/
does the work, this decides when — the old side holds the event loop from the export to the
successor's answer, then exits or serves on; the successor serves only once the old process
is gone), the periodic rate-limiter sweep, the bounded drain (every WebSocket closed 1001
`shutting down` within --drain-timeout; the metrics listener, with its `/readyz`, closes
last), and the exit code. Everything started is undone on one `AsyncExitStack`, in reverse
order, however start-up or serving ends.
Must never: validate flags (ops.boot did) or touch frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from pyrycode_relay.core.addresses import ListenAddress, Listeners
from pyrycode_relay.core.config import Config
from pyrycode_relay.core.handover_state import KIND_ACME, KIND_HTTPS, KIND_MAIN, KIND_METRICS
from pyrycode_relay.endpoints.relay import Relay
from pyrycode_relay.endpoints.router import MainRouter, MetricsRouter
from pyrycode_relay.ops import logbridge
from pyrycode_relay.ops.boot import ENV_FCM_CREDENTIALS, MSG_ENV, REASON_FCM_CREDENTIALS
from pyrycode_relay.ops.log import Logger, millis
from pyrycode_relay.ops.metrics import BuildInfo, MetricsExporter
from pyrycode_relay.ops.push import PushSender
from pyrycode_relay.ops.readiness import Readiness
from pyrycode_relay.ops.refusal import ExitCode, Refusal
from pyrycode_relay.ops.sdnotify import SystemdNotifier
from pyrycode_relay.transport.connection import (
    Connection,
    ConnSettings,
    Listener,
    Router,
    adopt_listener,
    listen,
)

if TYPE_CHECKING:
    from pyrycode_relay.cluster.placement import ClusterPlacement
    from pyrycode_relay.handover.taker import Predecessor
    from pyrycode_relay.tls.mode import TlsFrontEnd

Named = list[tuple[str, Listener]]  # each listener with its kind (handover/state.py)
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
        argv: Sequence[str] = (),
        predecessor: Predecessor | None = None,
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
        # Live handover (SIGUSR2): the arguments a successor starts with, and, in a
        # successor, the process it takes over from.
        self._argv = tuple(argv)
        self._predecessor = predecessor
        self._upgrade_task: asyncio.Task[None] | None = None
        self._router_kinds: dict[int, str] = {}  # id(router) → listener kind
        self._routers_by_kind: dict[str, Router] = {}
        self._handed_over = False  # a TLS mode's listeners went to a successor: draining
        self._serving: tuple[Relay, list[tuple[str, Listener]], LiveConnections] | None = None

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
            if self._predecessor is not None:
                # The predecessor named us already; said again in case that datagram was lost.
                self._notify.mainpid(os.getpid())
            status = self._status()
            self._notify.ready(status)
            stop_watching = self._watch_status(status)
            await self._stop.wait()
            stop_watching()
            if not self._handed_over:  # else the service goes on, in the successor
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
        if self._predecessor is not None:
            named = await self._take_over(relay, live, self._predecessor)
        else:
            named = await self._open_listeners(relay, live)
        servers = [server for _, server in named]
        self._serving = (relay, named, live)
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
            signal.SIGUSR2: self._on_upgrade,
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
        return self.config.mode

    def _routers(self, relay: Relay) -> dict[str, Router]:
        """The router of each listener kind: the WebSockets' and the metrics listener's
        (made once: a handover's restored connections and the listeners share them)."""
        if self._routers_by_kind:
            return self._routers_by_kind
        routers: dict[str, Router] = {KIND_MAIN: MainRouter(relay, self.readiness)}
        if self.listeners.metrics is not None:
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
            routers[KIND_METRICS] = MetricsRouter(exporter, self.readiness)
        self._router_kinds = {id(router): kind for kind, router in routers.items()}
        self._routers_by_kind = routers
        return routers

    async def _open_listeners(
        self,
        relay: Relay,
        live: LiveConnections,
        adopted: Mapping[str, list[socket.socket]] | None = None,
    ) -> list[tuple[str, Listener]]:
        """Every listener with its kind, in bind order (or, in a live handover's successor,
        over the `adopted` listening sockets of each kind); on a failure the ones already
        open are closed."""
        config = self.config
        settings = ConnSettings.from_config(config)
        routers = self._routers(relay)
        openers: list[tuple[str, ListenAddress, Callable[[], Awaitable[Listener]]]] = []
        router = routers[KIND_MAIN]

        async def bind_or_adopt(kind: str, address: ListenAddress, router: Router) -> Listener:
            if adopted is None:
                return await listen(address, router, settings, live)
            return await adopt_listener(adopted[kind], router, settings, live)

        if self._tls is None:
            address = self.listeners.main
            openers.append((KIND_MAIN, address, lambda: bind_or_adopt(KIND_MAIN, address, router)))
        else:
            openers.extend(self._tls.listeners(router, settings, live, adopted))
        metrics_address = self.listeners.metrics
        if metrics_address is not None:
            metrics = routers[KIND_METRICS]

            async def open_metrics() -> Listener:
                if adopted is None:
                    self.log.info("starting metrics listener", addr=metrics_address.text)
                listener = await bind_or_adopt(KIND_METRICS, metrics_address, metrics)
                self._metrics_listener = listener
                return listener

            openers.append((KIND_METRICS, metrics_address, open_metrics))
        servers: list[tuple[str, Listener]] = []
        for kind, address, open_listener in openers:
            try:
                servers.append((kind, await open_listener()))
            except OSError as exc:
                for _, server in servers:
                    server.close()
                raise ListenerFailed(address.text, exc.strerror or type(exc).__name__) from None
        return servers

    # -- live handover: the successor's side ------------------------------------------

    async def _take_over(
        self, relay: Relay, live: LiveConnections, predecessor: Predecessor
    ) -> list[tuple[str, Listener]]:
        """Take the listeners and connections of the process that started us (handover/
        taker.py); serve them once it is gone. A failure before our acknowledgement
        refuses the handover (the old process serves on) and ends this process."""
        from pyrycode_relay.handover.taker import take_over

        async def open_adopted(adopted: Mapping[str, list[socket.socket]]) -> Named:
            return await self._open_listeners(relay, live, adopted)

        named, connections, exported_at = await take_over(
            predecessor,
            relay,
            live,
            routers=self._routers(relay),
            settings=ConnSettings.from_config(self.config),
            kinds=self._listener_kinds(),
            within=self.config.handover_timeout,
            open_listeners=open_adopted,
        )
        self.log.info(
            "handover complete",
            pid=os.getpid(),
            connections=connections,
            duration_ms=millis(time.monotonic() - exported_at),
        )
        return named

    # -- live handover: the old process's side ----------------------------------------

    def _on_upgrade(self) -> None:
        if self._upgrade_task is not None or self._stop.is_set() or self._serving is None:
            self.log.info("upgrade signal ignored", signal="SIGUSR2")
            return
        self._upgrade_task = asyncio.create_task(self._upgrade())

    async def _upgrade(self) -> None:
        """Start the successor and hand everything to it, then exit; on any failure, kill
        it and serve on as if nothing happened (one log line says why)."""
        try:
            await self._hand_over()
        finally:
            self._upgrade_task = None

    async def _hand_over(self) -> None:
        from pyrycode_relay.core.handover_state import HandoverError
        from pyrycode_relay.handover.giver import Successor, blocked_by_init

        assert self._serving is not None
        relay, named, live = self._serving
        log = self.log
        log.info("upgrade signal received; starting the successor", signal="SIGUSR2")
        blocked = blocked_by_init(was_successor=self._predecessor is not None)
        if blocked:
            # In a container the successor would end with us: replace the container instead
            # (it drains as at a restart).
            log.warn("handover failed; serving on", reason=blocked)
            return
        timeout = self.config.handover_timeout
        try:
            successor = await Successor.start(self._argv, os.environ, timeout)
        except HandoverError as exc:
            log.warn("handover failed; serving on", reason=str(exc))
            return
        if self._stop.is_set():  # SIGTERM while the successor started: the drain wins
            successor.kill()
            log.warn("handover failed; serving on", reason="shutting down")
            return
        # From here to the exit (or the failure) the event loop is held: nothing is read,
        # written or accepted, so the state exported is the state handed over, and on a
        # failure every connection simply goes on. TLS modes hand over listeners only (TLS
        # sessions cannot leave the process), and so does cluster mode (the successor is
        # another instance; ours hands its ids back as at an orderly shutdown).
        drain = self._tls is not None or self._cluster is not None
        began = time.monotonic()
        try:
            handed = successor.give(
                relay, named, live, self._router_kinds, drain=drain, deadline=began + timeout
            )
        except HandoverError as exc:  # the successor is gone: we serve on
            log.warn("handover failed; serving on", reason=str(exc))
            return
        self._notify.mainpid(successor.pid)
        if drain:
            # The successor accepts from now on; we stop before the loop runs again, then
            # drain our connections (close 1001) and exit, as at a restart.
            for _, server in named:
                server.close()
            self._handed_over = True
            log.info(
                "handed over listeners; draining",
                pid=successor.pid,
                duration_ms=millis(time.monotonic() - began),
            )
            successor.channel.close()
            self._stop.set()
            return
        log.info(
            "handed over; exiting",
            pid=successor.pid,
            connections=handed,
            duration_ms=millis(time.monotonic() - began),
        )
        sys.stderr.flush()
        # No close frame, no FIN: the successor holds every socket; our copies just go.
        os._exit(ExitCode.OK)

    def _listener_kinds(self) -> set[str]:
        """The kinds of listener this configuration opens (a handover must carry them)."""
        kinds = {KIND_MAIN} if self._tls is None else {KIND_HTTPS}
        if self._tls is not None and not self._tls.static:
            kinds.add(KIND_ACME)
        if self.listeners.metrics is not None:
            kinds.add(KIND_METRICS)
        return kinds

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
