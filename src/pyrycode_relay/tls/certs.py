"""TLS server contexts: minimum TLS 1.2, the SNI gate, and hot certificate swaps.

Owns: the one "front" SSLContext every HTTPS listener uses, whose SNI callback (1) refuses
a handshake whose server name is not --domain (when a domain is configured; no SNI at all
is refused too, like Go's autocert) and (2) hands the handshake the *current*
certificate context. Installing a new certificate is one attribute assignment on the
event loop: handshakes that start afterwards see it, live connections keep theirs.
Loading a PEM pair (file reads, key parsing) is blocking, so callers run `load_pair` in a
worker thread and only `install` on the loop. Every certificate served passes `install`, so
its `on_install` hook is the one place that sees each of them (static at start and on
SIGHUP, ACME from the cache or the CA).
Must never: serve a handshake without a certificate (it fails with an alert instead), or
log — callers (and the `on_install` hook) log what they loaded.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

# We speak HTTP/1.1 only (the WebSocket upgrade); advertising h2 as Go's autocert does
# would let a client pick a protocol we cannot serve.
ALPN = ["http/1.1"]


class CertificateError(Exception):
    """A certificate/key pair could not be loaded; the message is one line, no secrets."""


@dataclass(frozen=True, slots=True)
class LoadedCert:
    context: ssl.SSLContext
    serial: int
    not_before: datetime  # timezone-aware UTC
    not_after: datetime
    names: tuple[str, ...]  # DNS names in the leaf's subjectAltName

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    return ctx


def load_pair(cert_path: str, key_path: str) -> LoadedCert:
    """Load a PEM chain (leaf first) and its private key into a fresh context. Blocking:
    run it in a worker thread. Raises CertificateError with a one-line reason."""
    try:
        with open(cert_path, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise CertificateError(f"reading certificate: {exc.strerror}") from None
    try:
        leaf = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertificateError("certificate file holds no PEM certificate") from None
    ctx = _base_context()
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except FileNotFoundError as exc:
        raise CertificateError(f"reading key: {exc.strerror}") from None
    except ssl.SSLError as exc:
        # e.g. KEY_VALUES_MISMATCH, or no PEM key; the reason names no key material.
        raise CertificateError(f"loading certificate and key: {exc.reason or 'invalid'}") from None
    except OSError as exc:
        raise CertificateError(f"loading certificate and key: {exc.strerror}") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return LoadedCert(
        ctx, leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc, names
    )


def _normalise(name: str) -> str:
    return name.rstrip(".").lower()


class CertSwitch:
    """The front context of the HTTPS listeners and the certificate currently served."""

    __slots__ = ("_domain", "_on_install", "current", "front")

    def __init__(self, domain: str, on_install: Callable[[LoadedCert], None] | None = None) -> None:
        self._domain = _normalise(domain)  # "" = no SNI gate (static certs without --domain)
        self._on_install = on_install
        self.current: LoadedCert | None = None
        self.front = _base_context()
        self.front.sni_callback = self._on_sni

    def install(self, cert: LoadedCert) -> None:
        """Serve `cert` to every handshake from now on (call on the event loop)."""
        self.current = cert
        if self._on_install is not None:
            self._on_install(cert)

    def _on_sni(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        if self._domain and (server_name is None or _normalise(server_name) != self._domain):
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        current = self.current
        if current is None:  # ACME has not delivered yet
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        conn.context = current.context
        return None
