"""The TLS modes' part of the lifecycle: certificate source, listeners, reload, renewal.

Owns: choosing the certificate source (static PEM files from --tls-cert/--tls-key, or
ACME autocert for --domain), the start-up checks that belong to it (a bad static pair →
exit 2; the cert cache directory policy → exit 1), the listeners a TLS mode opens
(HTTPS on --https-listen, directly or behind the PROXY v2 front; in ACME mode also the
port-80 challenge listener on --http-listen), reloading static files (the server calls
`reload` on SIGHUP), the ACME background task, and saying when a certificate it starts
serving is expired or expires within `EXPIRY_WARNING` (the expiry gauge reads `not_after`).
Must never: validate flags (ops.boot did), handle signals or drain connections (the server
does), log a refusal (it raises one), or log a key, a header value or an ACME key
authorization.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from pyrycode_relay.core.addresses import ListenAddress, Listeners
from pyrycode_relay.core.config import Config
from pyrycode_relay.core.handover_state import KIND_ACME, KIND_HTTPS
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.refusal import ExitCode, Refusal
from pyrycode_relay.tls.acme import AcmeSettings, AutoCert, ca_bundle_problem
from pyrycode_relay.tls.certcache import CertCacheRefusal, prepare_cert_cache
from pyrycode_relay.tls.certs import CertificateError, CertSwitch, LoadedCert, covers, load_pair
from pyrycode_relay.tls.proxyfront import ProxyListener, bind_sockets
from pyrycode_relay.tls.routes import AcmeHttpRouter, HostGate
from pyrycode_relay.transport.connection import (
    Connection,
    ConnSettings,
    Listener,
    Router,
    adopt_listener,
    listen,
)

# A certificate installed with less than this left is announced at WARN (already expired:
# ERROR). Let's Encrypt's renew with 30 days left, so an ACME one this close means renewal
# has been failing for two weeks; a static one means the operator's rotation did not run.
EXPIRY_WARNING = dt.timedelta(days=14)
MSG_CERTIFICATE = "refusing to start: invalid TLS certificate"
MSG_CA_BUNDLE = "refusing to start: invalid --acme-ca-bundle"
MSG_CERT_CACHE = "refusing to start: cert cache"
FIX_STATIC = "renew the certificate, replace the --tls-cert/--tls-key files, then send SIGHUP"
FIX_ACME = "renewal is failing: see the 'acme certificate request failed' lines"


def load_static(cert_path: str, key_path: str) -> LoadedCert:
    """The static certificate and key, or the start-up refusal saying what is wrong."""
    try:
        return load_pair(cert_path, key_path)
    except CertificateError as exc:
        raise Refusal(MSG_CERTIFICATE, {"reason": str(exc)}) from None


def check_ca_bundle(path: str) -> None:
    """Refuse a start whose --acme-ca-bundle cannot be used (empty: the system's CAs)."""
    problem = ca_bundle_problem(path) if path else None
    if problem is not None:
        raise Refusal(MSG_CA_BUNDLE, {"reason": problem})


def cert_cache_refused(path: str, exc: CertCacheRefusal) -> Refusal:
    """An unusable cert cache ends start-up with exit 1, as in the reference."""
    return Refusal(MSG_CERT_CACHE, {"path": path, "reason": str(exc)}, exit_code=ExitCode.RUNTIME)


def days_left(cert: LoadedCert, now: dt.datetime) -> float:
    """Days until `not_after`, one decimal, negative once expired (logs and the plan)."""
    return round((cert.not_after - now).total_seconds() / 86400, 1)


def announce(log: Logger, cert: LoadedCert, domain: str, fix: str) -> None:
    """The lines for a certificate we start serving (or `--check-config` would): expired or
    about to be, or not naming --domain. (A served one that ages into the window is the
    alert's job: the expiry gauge.)"""
    now = dt.datetime.now(dt.UTC)
    if domain and not covers(cert, domain):
        log.warn(
            "tls certificate does not name the domain",
            domain=domain,
            serial=cert.serial_hex,
            reason="clients dialling --domain refuse a certificate without that name",
            fix="use a certificate whose subjectAltName lists --domain, or fix --domain",
        )
    left = cert.not_after - now
    if left > EXPIRY_WARNING:
        return
    if left.total_seconds() <= 0:
        log.error(
            "tls certificate has expired",
            serial=cert.serial_hex,
            not_after=rfc3339(cert.not_after),
            days_left=days_left(cert, now),
            reason="not_after is in the past: TLS clients refuse this certificate",
            fix=fix,
        )
        return
    log.warn(
        "tls certificate expires soon",
        serial=cert.serial_hex,
        not_after=rfc3339(cert.not_after),
        days_left=days_left(cert, now),
        reason=f"not_after is less than {EXPIRY_WARNING.days} days away",
        fix=fix,
    )


def rfc3339(when: dt.datetime) -> str:
    """`2026-12-05T00:33:58Z`: the UTC instant, to the second."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """What a TLS mode needs of the configuration."""

    domain: str  # "" with static files: any name is served
    tls_cert: str  # "" in ACME mode
    tls_key: str
    cert_cache: str
    acme_directory: str
    acme_email: str
    acme_ca_bundle: str
    https_proxy_protocol: bool
    handshake_timeout: float  # also bounds the PROXY header and the TLS handshake

    @classmethod
    def from_config(cls, config: Config) -> TlsSettings:
        return cls(
            domain=config.domain,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            cert_cache=config.cert_cache,
            acme_directory=config.acme_directory,
            acme_email=config.acme_email,
            acme_ca_bundle=config.acme_ca_bundle,
            https_proxy_protocol=config.https_proxy_protocol,
            handshake_timeout=config.handshake_timeout,
        )


class TlsFrontEnd:
    """One TLS mode's certificate source and listeners."""

    def __init__(
        self, config: TlsSettings, listeners: Listeners, log: Logger, version: str
    ) -> None:
        self.config = config
        self.addresses = listeners
        self.log = log
        self.static = bool(config.tls_cert)
        self.switch = CertSwitch(config.domain, on_install=self._check_expiry)
        self.autocert: AutoCert | None = None
        self._task: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[None]] = set()
        if not self.static:
            self.autocert = AutoCert(
                AcmeSettings(
                    domain=config.domain,
                    directory=config.acme_directory,
                    email=config.acme_email,
                    ca_bundle=config.acme_ca_bundle,
                    cache_dir=config.cert_cache,
                    user_agent=f"pyrycode-relay/{version}",
                ),
                self.switch,
                log,
            )

    def prepare(self) -> None:
        """Start-up checks (blocking file access is fine before serving); raises Refusal."""
        config = self.config
        if self.static:
            cert = load_static(config.tls_cert, config.tls_key)
            self.log.info("tls certificate loaded", serial=cert.serial_hex)
            self.switch.install(cert)
            return
        check_ca_bundle(config.acme_ca_bundle)
        try:
            tightened = prepare_cert_cache(
                config.cert_cache, euid=os.geteuid(), platform=sys.platform
            )
        except CertCacheRefusal as exc:
            raise cert_cache_refused(config.cert_cache, exc) from None
        if tightened is not None:
            self.log.info(
                "tightened cert cache dir perms",
                path=tightened.path,
                from_=tightened.from_mode,
                to=tightened.to_mode,
            )

    def listeners(
        self,
        main: Router,
        settings: ConnSettings,
        live: set[Connection],
        adopted: Mapping[str, list[socket.socket]] | None = None,
    ) -> list[tuple[str, ListenAddress, Callable[[], Awaitable[Listener]]]]:
        """(kind, address, opener) for each listener, in bind order: the challenge listener
        first, so ACME can validate as soon as the HTTPS side exists. `main` serves the
        HTTPS side, behind the Host gate when a --domain is configured. With `adopted`
        (a live handover's listening sockets by kind), the openers serve those instead of
        binding."""
        config = self.config
        if config.domain:
            main = HostGate(main, config.domain)
        out: list[tuple[str, ListenAddress, Callable[[], Awaitable[Listener]]]] = []
        if self.autocert is not None:
            acme_router = AcmeHttpRouter(
                config.domain, self.autocert.challenges, self.autocert.challenge_fetched
            )
            http = self.addresses.acme
            assert http is not None  # ACME mode always has its port-80 listener

            async def open_acme() -> Listener:
                if adopted is not None:
                    return await adopt_listener(adopted[KIND_ACME], acme_router, settings, live)
                return await listen(http, acme_router, settings, live)

            out.append((KIND_ACME, http, open_acme))
        https = None if adopted is None else adopted[KIND_HTTPS]
        out.append(
            (KIND_HTTPS, self.addresses.main, lambda: self._https(main, settings, live, https))
        )
        return out

    async def _https(
        self,
        router: Router,
        settings: ConnSettings,
        live: set[Connection],
        adopted: list[socket.socket] | None,
    ) -> Listener:
        config = self.config
        address = self.addresses.main
        host, port = address.host, address.port
        settings = dataclasses.replace(settings, write_high_floor=1)  # see ConnSettings
        if adopted is not None and not config.https_proxy_protocol:
            return await adopt_listener(
                adopted,
                router,
                settings,
                live,
                ssl=self.switch.front,
                ssl_handshake_timeout=config.handshake_timeout,
            )
        if config.https_proxy_protocol:
            sockets = bind_sockets(host, port) if adopted is None else adopted
            for sock in sockets:
                sock.setblocking(False)  # (already so: the open file is the predecessor's)

            def make(client_host: str) -> Connection:
                return Connection(router, settings, live, peer_host=client_host)

            return ProxyListener(
                sockets,
                self.switch.front,
                make,
                self.addresses.proxy_allow,
                config.handshake_timeout,
            )
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: Connection(router, settings, live),
            host or None,
            port,
            backlog=4096,
            ssl=self.switch.front,
            ssl_handshake_timeout=config.handshake_timeout,
        )

    def start(self) -> None:
        """After the listeners are up: ACME issuance and renewal."""
        if self.autocert is not None:
            self._task = asyncio.get_running_loop().create_task(self.autocert.run())

    @property
    def has_certificate(self) -> bool:
        """A certificate is being served (ACME may not have delivered one yet)."""
        return self.switch.current is not None

    def reload(self) -> asyncio.Task[None]:
        """Static files: load them again (off the loop) and serve them if they are good."""
        task = asyncio.get_running_loop().create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        return task

    async def _reload(self) -> None:
        config = self.config
        try:
            cert = await asyncio.to_thread(load_pair, config.tls_cert, config.tls_key)
        except CertificateError as exc:
            self.log.error("tls certificate reload failed; keeping the old one", err=str(exc))
            return
        self.log.info("tls certificate reloaded", serial=cert.serial_hex)
        self.switch.install(cert)

    def not_after(self) -> float | None:
        """The served certificate's notAfter in Unix seconds; None before ACME delivers."""
        current = self.switch.current
        return None if current is None else current.not_after.timestamp()

    def _check_expiry(self, cert: LoadedCert) -> None:
        announce(self.log, cert, self.config.domain, FIX_STATIC if self.static else FIX_ACME)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
