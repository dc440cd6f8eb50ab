"""The relay's only outbound network calls: an OAuth2 access token and FCM HTTP v1 sends.

Owns: parsing and validating the service-account key (`PYRYCODE_RELAY_FCM_CREDENTIALS`), the
OAuth2 JWT-bearer token exchange (RS256 assertion signed by google-auth, posted with httpx to the
key's `token_uri`) and its cache, the FCM send request (exact body, no redirects, 10 s per HTTP
call, at most 4 KiB of the reply read) and turning a reply into one of the outcomes of reference
§12, with an error text built only from the HTTP status and FCM's enum-like codes.
Must never: log (ops.push logs the outcome), put the device token, the key, the access token or
any free text from Google into an error, or block the event loop on I/O. google-auth's own
`refresh()` is synchronous (requests-based), so only its key handling and JWT signing are used
here; signing one assertion costs about a millisecond, once per token lifetime.

This module is imported only when push is configured: google-auth, cryptography and httpx add
tens of milliseconds to a start-up that otherwise does not need them.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

import httpx
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from google.auth import crypt, jwt

from pyrycode_relay.ops.push import (
    ERR_SEND,
    OUTCOME_SEND_FAILED,
    OUTCOME_SENT,
    OUTCOME_TOKEN_FETCH_FAILED,
    OUTCOME_UNREGISTERED,
    SendResult,
)

SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_TOKEN_URI: Final = "https://oauth2.googleapis.com/token"
GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_PROJECT: Final = "pyrycode-mobile"  # hard-coded in the reference too
HTTP_TIMEOUT: Final = 10.0  # seconds, the whole of one HTTP call
REPLY_LIMIT: Final = 4096  # bytes of an FCM reply ever read
TOKEN_REPLY_LIMIT: Final = 65536  # a token reply is ~1 KiB; the cap only bounds a hostile one
ASSERTION_LIFETIME: Final = 3600  # seconds; Google's maximum
# Refresh this long before the access token expires, so a send never carries a token that
# expires in flight (golang.org/x/oauth2 uses 10 s; a minute also absorbs clock skew).
EXPIRY_MARGIN: Final = 60.0

ERR_CREDENTIALS: Final = "relay: fcm credentials are not a service-account JSON key"
ERR_TOKEN: Final = "relay: fcm access-token fetch failed"

_MESSAGE_ID = re.compile(r"[A-Za-z0-9/:%_-]{1,256}")
_ENUM = re.compile(r"[A-Z0-9_]{1,64}")
_encode = msgspec.json.encode


class CredentialsError(ValueError):
    """The key is unusable. The text is always ERR_CREDENTIALS: never a part of the value."""

    def __init__(self) -> None:
        super().__init__(ERR_CREDENTIALS)


class TokenFetchError(Exception):
    """The token endpoint failed; `str()` is ERR_TOKEN plus a status or exception class."""


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    client_email: str
    token_uri: str
    signer: crypt.Signer

    def __repr__(self) -> str:  # the signer holds the private key: never print it
        return "ServiceAccount(...)"


def parse_service_account(text: str) -> ServiceAccount:
    """A Google service-account JSON key: `type` "service_account", a non-empty
    `client_email`, an RSA `private_key` in PEM (PKCS#8 or PKCS#1), an optional `token_uri`.
    Raises CredentialsError (without any part of `text`) otherwise."""
    try:
        info = json.loads(text)
    except ValueError:
        raise CredentialsError from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise CredentialsError
    email = info.get("client_email")
    pem = info.get("private_key")
    token_uri = info.get("token_uri") or DEFAULT_TOKEN_URI
    key_id = info.get("private_key_id")
    if not (isinstance(email, str) and email and isinstance(pem, str)):
        raise CredentialsError
    if not isinstance(token_uri, str) or not (key_id is None or isinstance(key_id, str)):
        raise CredentialsError
    try:
        # One loader handles both PEM forms ("PRIVATE KEY" = PKCS#8, "RSA PRIVATE KEY" =
        # PKCS#1). Any failure — bad PEM, an encrypted key, an unsupported algorithm — is the
        # same refusal, and its text (which may quote the key) is dropped.
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except Exception:
        raise CredentialsError from None
    if not isinstance(key, RSAPrivateKey):
        raise CredentialsError  # an EC key cannot sign the RS256 assertion Google expects
    signer = crypt.RSASigner(key, key_id=key_id)
    return ServiceAccount(email, token_uri, signer)


def message_body(token: str) -> bytes:
    """`{"message":{"token":"<token>","android":{"priority":"HIGH"}}}`: no notification and
    no data, so the wake tells the phone nothing but "reconnect"."""
    return b'{"message":{"token":' + _encode(token) + b',"android":{"priority":"HIGH"}}}'


def _json(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None  # also a reply cut at REPLY_LIMIT: no details then


def classify_reply(status: int, body: bytes, token: str) -> SendResult:
    """One FCM reply (status, first REPLY_LIMIT bytes) for a wake to `token` as an outcome
    (reference §12)."""
    reply = _json(body)
    if 200 <= status < 300:
        name = reply.get("name") if isinstance(reply, dict) else None
        # The charset keeps quoting and free text out; a hostile endpoint could still echo
        # the device token (all of whose characters are in that set), so that is refused too.
        safe = (
            isinstance(name, str) and _MESSAGE_ID.fullmatch(name) is not None and token not in name
        )
        return SendResult(OUTCOME_SENT, message_id=name if safe else None)
    error = reply.get("error") if isinstance(reply, dict) else None
    error_status = error_code = None
    if isinstance(error, dict):
        value = error.get("status")
        if isinstance(value, str) and _ENUM.fullmatch(value):
            error_status = value
        details = error.get("details")
        if isinstance(details, list):
            for detail in details:
                code = detail.get("errorCode") if isinstance(detail, dict) else None
                if isinstance(code, str):
                    if _ENUM.fullmatch(code):
                        error_code = code
                    break  # the first errorCode decides, safe to show or not
    err = f"{ERR_SEND}: status {status}"
    shown = [v for v in (error_status, error_code) if v is not None]
    if shown:
        err += f" ({', '.join(shown)})"
    outcome = OUTCOME_UNREGISTERED if error_code == "UNREGISTERED" else OUTCOME_SEND_FAILED
    return SendResult(outcome, err)


def _failure_name(exc: BaseException) -> str:
    """An exception as its class name only: httpx and OS error texts may quote URLs."""
    return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of the body; the rest is never read (the connection is dropped
    when the stream closes unread)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def build_sender(credentials: str, endpoint: str) -> FcmClient:
    """The FCM sender for a service-account key; raises CredentialsError."""
    return FcmClient(parse_service_account(credentials), endpoint)


class FcmClient:
    """Sends wakes for one service account. Concurrent sends share one access token and at
    most one token fetch at a time; `aclose()` cancels the fetch and closes the pool."""

    def __init__(
        self, account: ServiceAccount, endpoint: str, *, timeout: float = HTTP_TIMEOUT
    ) -> None:
        self._account = account
        self._url = f"{endpoint.rstrip('/')}/v1/projects/{FCM_PROJECT}/messages:send"
        self._timeout = timeout
        # Redirects are failures (a 3xx is reported, never followed). httpx's timeout is per
        # operation; asyncio.timeout below bounds each whole call.
        self._http = httpx.AsyncClient(follow_redirects=False, timeout=timeout)
        self._access_token = ""
        self._expires_at = 0.0  # time.monotonic()
        self._fetch: asyncio.Task[str] | None = None

    async def send(self, token: str) -> SendResult:
        """Never raises except CancelledError; every failure is a SendResult."""
        try:
            access_token = await self._token()
        except TokenFetchError as exc:
            return SendResult(OUTCOME_TOKEN_FETCH_FAILED, str(exc))
        headers = {"Authorization": f"Bearer {access_token}", "Content-Type": "application/json"}
        try:
            async with asyncio.timeout(self._timeout):
                request = self._http.stream(
                    "POST", self._url, content=message_body(token), headers=headers
                )
                async with request as response:
                    status = response.status_code
                    body = await _read_capped(response, REPLY_LIMIT)
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            return SendResult(OUTCOME_SEND_FAILED, f"{ERR_SEND}: {_failure_name(exc)}")
        return classify_reply(status, body, token)

    async def _token(self) -> str:
        if self._access_token and time.monotonic() < self._expires_at - EXPIRY_MARGIN:
            return self._access_token
        fetch = self._fetch
        if fetch is None or fetch.done():
            fetch = self._fetch = asyncio.get_running_loop().create_task(self._fetch_token())
        # Shielded: one waiter cancelled by shutdown must not fail the fetch the other waiters
        # share. A failed fetch fails every waiter once; the next wake starts a new fetch.
        return await asyncio.shield(fetch)

    async def _fetch_token(self) -> str:
        account = self._account
        now = int(time.time())
        claims = {
            "iss": account.client_email,
            "scope": SCOPE,
            "aud": account.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        try:
            assertion: bytes = jwt.encode(account.signer, claims)
            form = urlencode({"grant_type": GRANT_TYPE, "assertion": assertion.decode("ascii")})
            started = time.monotonic()
            async with asyncio.timeout(self._timeout):
                request = self._http.stream(
                    "POST",
                    account.token_uri,
                    content=form.encode("ascii"),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                )
                async with request as response:
                    status = response.status_code
                    body = await _read_capped(response, TOKEN_REPLY_LIMIT)
        except Exception as exc:
            # Whatever failed (signing, transport, timeout), the outcome is the same:
            # token_fetch_failed, reported by class name only. CancelledError is not an
            # Exception and passes through.
            raise TokenFetchError(f"{ERR_TOKEN}: {_failure_name(exc)}") from None
        if not 200 <= status < 300:
            raise TokenFetchError(f"{ERR_TOKEN}: status {status}")
        reply = _json(body)
        access_token = reply.get("access_token") if isinstance(reply, dict) else None
        expires_in = reply.get("expires_in", ASSERTION_LIFETIME) if isinstance(reply, dict) else 0
        if not isinstance(access_token, str) or not access_token:
            raise TokenFetchError(f"{ERR_TOKEN}: no access_token in the reply")
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
            expires_in = 0  # usable once, fetched again next time
        self._access_token = access_token
        self._expires_at = started + float(expires_in)
        return access_token

    async def aclose(self) -> None:
        fetch = self._fetch
        if fetch is not None and not fetch.done():
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)  # let it unwind before the pool
        await self._http.aclose()
