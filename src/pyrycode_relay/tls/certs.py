"""TLS server contexts: minimum TLS 1.2, the SNI gate, and hot certificate swaps.

Owns: the one "front" SSLContext every HTTPS listener uses, whose SNI callback (1) refuses
a handshake whose server name is not --domain (when a domain is configured; no SNI at all
is refused too, like Go's autocert) and (2) hands the handshake the *current*
certificate context. Installing a new certificate is one attribute assignment on the
event loop: handshakes that start afterwards see it, live connections keep theirs.
Loading a PEM pair (file reads, key parsing) is blocking, so callers run `load_pair` in a
worker thread and only `install` on the loop. Every certificate served passes `install`, so
its `on_install` hook is the one place that sees each of them (static at start and on
SIGHUP, ACME from the cache or the CA). A pair that cannot be served is refused in plain
words naming the file at fault (unreadable, empty, no or malformed PEM, swapped files, an
encrypted key, a key of another certificate) rather than in OpenSSL's codes.
Must never: serve a handshake without a certificate (it fails with an alert instead), put
a file's content in an error, or log — callers (and the `on_install` hook) log what they
loaded.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

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
        return serial_hex(self.serial)


def serial_hex(serial: int) -> str:
    """A serial as `openssl x509 -noout -serial` prints it: uppercase hex, whole bytes
    (an even number of digits, so a leading zero is kept), no separators."""
    digits = format(serial, "X")
    return digits if len(digits) % 2 == 0 else "0" + digits


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    return ctx


_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_KEY_END = b"PRIVATE KEY-----"  # PKCS#8, PKCS#1 (RSA), SEC1 (EC), encrypted PKCS#8
_SWAPPED = "are --tls-cert and --tls-key swapped?"
# OpenSSL's words for a key that belongs to another certificate: it drops the certificate
# and then finds none (NO_CERTIFICATE_ASSIGNED), or says so (KEY_VALUES_MISMATCH).
_MISMATCH_REASONS = frozenset({"NO_CERTIFICATE_ASSIGNED", "KEY_VALUES_MISMATCH"})


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CertificateError(
            f"{what} file {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    if not data.strip():
        raise CertificateError(f"{what} file {path} is empty")
    return data


def _certificates(pem: bytes, path: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        pass
    if _CERT_BEGIN in pem:
        raise CertificateError(f"certificate file {path}: a PEM certificate in it is malformed")
    if _KEY_END in pem:
        raise CertificateError(
            f"certificate file {path} holds a private key, not a certificate ({_SWAPPED})"
        )
    raise CertificateError(f"certificate file {path} holds no PEM certificate")


def _private_key(pem: bytes, path: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise CertificateError(
            f"key file {path}: the key is encrypted (a passphrase-protected key is not supported)"
        ) from None
    except UnsupportedAlgorithm:
        raise CertificateError(f"key file {path}: unsupported key type") from None
    except ValueError:
        pass
    if _KEY_END in pem:
        raise CertificateError(f"key file {path}: its PEM private key is malformed")
    if _CERT_BEGIN in pem:
        raise CertificateError(
            f"key file {path} holds a certificate, not a private key ({_SWAPPED})"
        )
    raise CertificateError(f"key file {path} holds no PEM private key")


def _public_der(holder: x509.Certificate | PrivateKeyTypes) -> bytes | None:
    try:
        public = holder.public_key()
        return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, UnsupportedAlgorithm):
        return None  # a key type cryptography cannot compare: OpenSSL decides below


def _check_match(chain: list[x509.Certificate], key: PrivateKeyTypes, cert_path: str) -> None:
    """Raise the plain-words error when the key is not the first certificate's."""
    key_der = _public_der(key)
    leaf_der = _public_der(chain[0])
    if key_der is None or leaf_der is None or key_der == leaf_der:
        return
    if any(_public_der(c) == key_der for c in chain[1:]):
        raise CertificateError(
            f"certificate and key do not match: the key belongs to a later certificate in"
            f" {cert_path}; the server's own certificate must come first"
        )
    raise CertificateError("certificate and key do not match")


def load_pair(cert_path: str, key_path: str) -> LoadedCert:
    """Load a PEM chain (leaf first) and its private key into a fresh context. Blocking:
    run it in a worker thread. Raises CertificateError with a one-line reason in plain
    words that names the file at fault and never quotes its content."""
    chain = _certificates(_read(cert_path, "certificate"), cert_path)
    key = _private_key(_read(key_path, "key"), key_path)
    _check_match(chain, key, cert_path)
    leaf = chain[0]
    ctx = _base_context()
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        # The files changed since they were read, or OpenSSL disagrees with the checks
        # above; its reason names no key material.
        if exc.reason in _MISMATCH_REASONS:
            raise CertificateError("certificate and key do not match") from None
        raise CertificateError(
            f"loading {cert_path} and {key_path}: {exc.reason or 'invalid'}"
        ) from None
    except OSError as exc:
        raise CertificateError(
            f"loading {cert_path} and {key_path}: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return LoadedCert(
        ctx, leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc, names
    )


def covers(cert: LoadedCert, domain: str) -> bool:
    """Whether a client dialling `domain` accepts `cert` by name (a SAN DNS name, or a
    `*.` wildcard for exactly one label, as RFC 6125 matches)."""
    want = _normalise(domain)
    for given in cert.names:
        name = _normalise(given)
        if name == want:
            return True
        if name.startswith("*.") and "." in want and want.split(".", 1)[1] == name[2:]:
            return True
    return False


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
