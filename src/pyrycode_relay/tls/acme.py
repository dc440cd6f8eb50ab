"""Autocert: an ACME (RFC 8555) client for --domain, built on certbot's `acme` library.

Owns: the account key and the certificate + key in --cert-cache (files 0600, written
atomically), the http-01 challenge map the port-80 listener answers from, issuing at
start-up (unless a usable certificate is cached), and renewing in the background once
less than a third of the certificate's lifetime is left (Let's Encrypt's 90-day
certificates renew with 30 days to go, as Go's autocert does). Each new certificate is
installed into the CertSwitch, so the next handshake serves it without a restart.

Threading: `acme`'s network calls are synchronous (requests, with 1 s polling sleeps), so
`issue()` runs in a daemon worker thread; the event loop only awaits its future, loads
the files (also off the loop) and swaps the context. A daemon thread, not the default
executor, because asyncio.run joins executor threads at exit and a slow ACME server
must not hold up a shutdown. The challenge map is a dict written by that thread and read
by the loop; single-key assignments and deletions are atomic in CPython.
Progress is logged at INFO as it happens (order created, challenge served and fetched,
validated, finalizing, certificate obtained): the worker thread reports through
`AcmeProgress`, whose lines are written on the loop. A failure is logged whole, on one line
(an error's lines joined), bounded to ERR_MAX characters at a word boundary and marked `…`.
Must never: request or serve a name other than --domain, block the event loop, log from
the worker thread (lines would interleave with the loop's), or log key material or a key
authorization (replaced in error texts).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from pyrycode_relay.ops.log import Logger, millis
from pyrycode_relay.tls.certs import CertificateError, CertSwitch, LoadedCert, load_pair

T = TypeVar("T")

ACCOUNT_KEY_FILE: Final = "acme_account.key"
ORDER_DEADLINE: Final = dt.timedelta(seconds=90)
RETRY_FIRST: Final = 1.0  # seconds after a failed order; doubles up to RETRY_MAX
RETRY_MAX: Final = 3600.0
# A certificate's renewal time is re-read at least this often, so a clock jump or a
# suspended VM cannot make the relay sleep past it.
MAX_SLEEP: Final = 3600.0
# Longest error text logged. requests' connection errors run to ~300 characters and a
# failed challenge's problem document to a few hundred more; a proxy's HTML error page
# must not become a megabyte log line.
ERR_MAX: Final = 1000
CHALLENGE_TYPE: Final = "http-01"


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    domain: str
    directory: str
    email: str
    ca_bundle: str  # "" = the system trust store
    cache_dir: str
    user_agent: str

    @property
    def cert_path(self) -> str:
        return os.path.join(self.cache_dir, f"{self.domain}.crt")

    @property
    def key_path(self) -> str:
        return os.path.join(self.cache_dir, f"{self.domain}.key")


def ca_bundle_problem(path: str) -> str | None:
    """Why `--acme-ca-bundle` cannot be used to trust the ACME directory, or None."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:
        return f"{path} holds no PEM CA certificate"
    except OSError as exc:
        return f"{path}: {exc.strerror or type(exc).__name__}"
    return None


def renew_at(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When to renew: once less than a third of the lifetime is left."""
    return not_after - (not_after - not_before) / 3


def _write_private(path: str, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically (a crash leaves the old file)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing tmp file
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _account_key(path: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        pass
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(path, pem)
    return pem


class AcmeProgress(Protocol):
    """What `issue` reports as it goes; called from the worker thread."""

    def order_created(self) -> None: ...
    def challenge_served(self) -> None: ...
    def authorization_valid(self) -> None: ...
    def challenge_validated(self) -> None: ...
    def finalizing(self) -> None: ...


class AcmeError(Exception):
    """One certificate request failed; the message is `error_text`'s one line."""


def error_text(exc: BaseException, hide: Iterable[str] = ()) -> str:
    """`Type: message` on one line: the message's lines joined with spaces (a failed
    challenge's reason is on the second line of acme's ValidationError), every string in
    `hide` replaced, and cut at a word boundary with `…` beyond ERR_MAX characters."""
    message = " ".join(line.strip() for line in _said(exc).splitlines() if line.strip())
    for secret in hide:
        message = message.replace(secret, "[key authorization]")
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if len(text) <= ERR_MAX:
        return text
    cut = text[: ERR_MAX - 1]
    space = cut.rfind(" ")
    if space > ERR_MAX // 2:  # a word boundary not too far back; else cut mid-token
        cut = cut[:space]
    return cut.rstrip() + "…"


def _said(exc: BaseException) -> str:
    """What an exception says; a failed authorization says which challenge failed and the
    CA's reason, in every acme release (before 5.0 its ValidationError says nothing)."""
    from acme import errors

    if not isinstance(exc, errors.ValidationError):
        return str(exc)
    lines = []
    for authzr in exc.failed_authzrs:
        lines.append(
            f"Authorization for {authzr.body.identifier.value} failed due to one or more"
            " failed challenges:"
        )
        lines.extend(
            f"Challenge {challenge.chall.typ} failed with error {challenge.error}"
            for challenge in authzr.body.challenges
        )
    return "\n".join(lines)


def issue(settings: AcmeSettings, challenges: dict[str, str], progress: AcmeProgress) -> None:
    """Order a certificate for the domain over http-01 and write it (full chain) and its
    new key into the cache. Blocking; raises AcmeError on any failure."""
    served: list[str] = []
    try:
        _issue(settings, challenges, progress, served)
    except Exception as exc:
        raise AcmeError(error_text(exc, hide=served)) from exc


def _issue(
    settings: AcmeSettings,
    challenges: dict[str, str],
    progress: AcmeProgress,
    served: list[str],
) -> None:
    # Imported here: `acme` pulls in requests and josepy, which insecure mode never needs.
    from acme import challenges as acme_challenges
    from acme import client, crypto_util, errors, messages
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from josepy.jwa import ES256
    from josepy.jwk import JWKEC

    account_pem = _account_key(os.path.join(settings.cache_dir, ACCOUNT_KEY_FILE))
    account_key = serialization.load_pem_private_key(account_pem, password=None)
    assert isinstance(account_key, ec.EllipticCurvePrivateKey)
    jwk = JWKEC(key=account_key)
    # requests' `verify` takes a CA bundle path as well as a bool.
    verify: bool = settings.ca_bundle or True  # type: ignore[assignment]
    net = client.ClientNetwork(jwk, alg=ES256, verify_ssl=verify, user_agent=settings.user_agent)
    ca = client.ClientV2(client.ClientV2.get_directory(settings.directory, net), net)
    registration = messages.NewRegistration.from_data(
        email=settings.email or None, terms_of_service_agreed=True
    )
    try:
        ca.new_account(registration)
    except errors.ConflictError as exc:  # the key already has an account: look it up
        ca.query_registration(messages.RegistrationResource(uri=exc.location, body=registration))

    cert_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    order = ca.new_order(crypto_util.make_csr(cert_key, [settings.domain]))
    progress.order_created()
    tokens: list[str] = []
    try:
        pending = False
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                progress.authorization_valid()
                continue  # a still-valid earlier authorization needs no new challenge
            challb = next(
                (c for c in authz.body.challenges if isinstance(c.chall, acme_challenges.HTTP01)),
                None,
            )
            if challb is None:
                raise errors.Error(f"the ACME server offered no {CHALLENGE_TYPE} challenge")
            response, validation = challb.response_and_validation(jwk)
            token = challb.chall.encode("token")
            challenges[token] = validation
            served.append(validation)
            tokens.append(token)
            # Reported before the CA is told, so this line precedes its fetches'.
            progress.challenge_served()
            ca.answer_challenge(challb, response)
            pending = True
        deadline = dt.datetime.now() + ORDER_DEADLINE
        order = ca.poll_authorizations(order, deadline)
        if pending:
            progress.challenge_validated()
        progress.finalizing()
        order = ca.finalize_order(order, deadline)
    finally:
        for token in tokens:
            challenges.pop(token, None)
    _write_private(settings.key_path, cert_key)
    _write_private(settings.cert_path, order.fullchain_pem.encode("ascii"))


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="acme", daemon=True).start()
    return future


class AutoCert:
    """Keeps a valid certificate for the domain installed in `switch`."""

    def __init__(self, settings: AcmeSettings, switch: CertSwitch, log: Logger) -> None:
        self.settings = settings
        self.switch = switch
        self.log = log
        self.challenges: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- AcmeProgress: called in the worker thread, logged on the loop ------------------

    def _soon(self, line: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody reads
                loop.call_soon_threadsafe(line)

    def order_created(self) -> None:
        domain = self.settings.domain
        self._soon(lambda: self.log.info("acme order created", domain=domain))

    def authorization_valid(self) -> None:
        domain = self.settings.domain
        self._soon(
            lambda: self.log.info("acme authorization still valid, no challenge", domain=domain)
        )

    def challenge_served(self) -> None:
        domain = self.settings.domain
        self._soon(
            lambda: self.log.info(
                "acme challenge served, waiting for validation",
                domain=domain,
                challenge=CHALLENGE_TYPE,
            )
        )

    def challenge_validated(self) -> None:
        domain = self.settings.domain
        self._soon(
            lambda: self.log.info(
                "acme challenge validated", domain=domain, challenge=CHALLENGE_TYPE
            )
        )

    def finalizing(self) -> None:
        domain = self.settings.domain
        self._soon(lambda: self.log.info("acme order finalizing", domain=domain))

    def challenge_fetched(self, remote: str) -> None:
        """The port-80 listener answered a challenge request (on the loop): the CA, or
        one of its validation vantage points, reached us."""
        self.log.info(
            "acme challenge fetched",
            domain=self.settings.domain,
            challenge=CHALLENGE_TYPE,
            remote=remote,
        )

    async def _load(self) -> LoadedCert:
        s = self.settings
        return await _in_daemon_thread(lambda: load_pair(s.cert_path, s.key_path))

    def _load_cached(self) -> LoadedCert | None:
        s = self.settings
        if not os.path.exists(s.cert_path):
            return None  # first start: nothing cached yet
        return load_pair(s.cert_path, s.key_path)

    def _usable(self, cert: LoadedCert, now: dt.datetime) -> bool:
        return self.settings.domain in cert.names and now < renew_at(
            cert.not_before, cert.not_after
        )

    async def run(self) -> None:
        """Forever: install the cached certificate if usable, else order one; then sleep
        until its renewal time and renew. Failures retry with exponential backoff."""
        domain = self.settings.domain
        self._loop = asyncio.get_running_loop()
        try:
            cached = await _in_daemon_thread(self._load_cached)
        except CertificateError as exc:
            self.log.warn("acme cached certificate unusable", domain=domain, err=str(exc))
        else:
            if cached is not None and cached.not_after > dt.datetime.now(dt.UTC):
                self._install(cached, cached=True)
        retry = RETRY_FIRST
        while True:
            current = self.switch.current
            now = dt.datetime.now(dt.UTC)
            if current is not None and self._usable(current, now):
                wait = (renew_at(current.not_before, current.not_after) - now).total_seconds()
                await asyncio.sleep(min(max(wait, 0.0), MAX_SLEEP))
                continue
            try:
                await _in_daemon_thread(self._issue)
                fresh = await self._load()
            except Exception as exc:
                self.log.error(
                    "acme certificate request failed",
                    domain=domain,
                    err=str(exc) if isinstance(exc, AcmeError) else error_text(exc),
                    retry_ms=millis(retry),
                )
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)
                continue
            retry = RETRY_FIRST
            self._install(fresh, cached=False)

    def _issue(self) -> None:
        issue(self.settings, self.challenges, self)

    def _install(self, cert: LoadedCert, *, cached: bool) -> None:
        self.switch.install(cert)
        if not cached:
            self.log.info(
                "acme certificate obtained",
                domain=self.settings.domain,
                serial=cert.serial_hex,
                not_after=cert.not_after.isoformat(),
            )
        else:
            self.log.info(
                "acme certificate loaded from cache",
                domain=self.settings.domain,
                serial=cert.serial_hex,
                not_after=cert.not_after.isoformat(),
            )
