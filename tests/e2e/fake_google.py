"""A fake Google on loopback for push tests: the OAuth2 token endpoint and FCM HTTP v1.

One asyncio HTTP/1.1 server (h11, already a relay dependency) records every request and
answers it as the test programs it: the token endpoint with a fixed access token (or a
failure), the FCM endpoint per device token (a status and body, a hang until released, or an
endless body). The relay under test reaches it through the key's `token_uri` and
`--fcm-endpoint`, both ordinary configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import parse_qs

import h11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

TOKEN_PATH = "/token"
SEND_PATH = "/v1/projects/pyrycode-mobile/messages:send"
ACCESS_TOKEN = "ya29.access-token-q8w3"  # must never appear in the relay's logs
CLIENT_EMAIL = "relay-push@pyrycode-mobile.iam.gserviceaccount.com"
KEY_ID = "0123456789abcdef"


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: Any, fmt: serialization.PrivateFormat) -> str:
    data: bytes = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return data.decode()


def pkcs8_pem() -> str:
    return pem(rsa_key(), serialization.PrivateFormat.PKCS8)


def pkcs1_pem() -> str:
    return pem(rsa_key(), serialization.PrivateFormat.TraditionalOpenSSL)


def ec_pem() -> str:
    return pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8)


def service_account(token_uri: str | None, private_key: str | None = None, **extra: Any) -> str:
    """A service-account JSON key as Google issues it (fields in Google's order)."""
    info: dict[str, Any] = {
        "type": "service_account",
        "project_id": "pyrycode-mobile",
        "private_key_id": KEY_ID,
        "private_key": pkcs8_pem() if private_key is None else private_key,
        "client_email": CLIENT_EMAIL,
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
    }
    if token_uri is not None:
        info["token_uri"] = token_uri
    info.update(extra)
    return json.dumps(info)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode())

    @property
    def device_token(self) -> str:
        token: str = json.loads(self.body)["message"]["token"]
        return token


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"name":"projects/pyrycode-mobile/messages/0:1700000000%abc_DEF-12"}'
    headers: list[tuple[str, str]] = field(default_factory=list)
    hang: bool = False  # answer only after `FakeGoogle.release(token)`
    endless: bool = False  # stream a body that never ends


def fcm_error(status: int, code: str, error_status: str, message: str = "") -> Reply:
    body = {
        "error": {
            "code": status,
            "message": message or "Requested entity was not found.",
            "status": error_status,
            "details": [
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
            ],
        }
    }
    return Reply(status, json.dumps(body).encode())


class FakeGoogle:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.token_reply = Reply(
            200,
            json.dumps(
                {"access_token": ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer"}
            ).encode(),
        )
        self.replies: dict[str, Reply] = {}  # by device token; default Reply()
        self._released: dict[str, asyncio.Event] = {}
        self._arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return self.url + TOKEN_PATH

    def credentials(self, **extra: Any) -> str:
        return service_account(self.token_uri, **extra)

    def token_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path == TOKEN_PATH]

    def sends(self) -> list[Request]:
        return [r for r in self.requests if r.path != TOKEN_PATH]

    def sent_tokens(self) -> list[str]:
        return [r.device_token for r in self.requests if r.path == SEND_PATH]

    def release(self, token: str) -> None:
        self._released.setdefault(token, asyncio.Event()).set()

    async def wait_sends(self, n: int, timeout: float = 5.0) -> list[Request]:
        """Waits until at least `n` requests other than token fetches arrived."""
        async with asyncio.timeout(timeout):
            while len(self.sends()) < n:
                self._arrived.clear()
                await self._arrived.wait()
        return self.sends()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            request = await self._read(reader)
            if request is not None:
                self.requests.append(request)
                self._arrived.set()
                await self._answer(request, writer)
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> Request | None:
        conn = h11.Connection(h11.SERVER)
        head: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {k.decode().lower(): v.decode() for k, v in head.headers}
                return Request(head.method.decode(), head.target.decode(), headers, body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _answer(self, request: Request, writer: asyncio.StreamWriter) -> None:
        if request.path == TOKEN_PATH:
            reply = self.token_reply
            key = ""
        elif request.path == SEND_PATH:
            key = request.device_token
            reply = self.replies.get(key, Reply())
        else:
            key = ""
            reply = Reply(404, b"{}")
        if reply.hang:
            await self._released.setdefault(key, asyncio.Event()).wait()
        head = [f"HTTP/1.1 {reply.status} X", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in reply.headers]
        if reply.endless:
            head.append("Transfer-Encoding: chunked")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            first = reply.body
            writer.write(b"%x\r\n%s\r\n" % (len(first), first))
            chunk = b" " * 4096
            for _ in range(1000):  # bounded: the relay should stop reading long before
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                await asyncio.sleep(0.01)
            return
        head += [f"Content-Length: {len(reply.body)}", "Connection: close"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body)
        await writer.drain()


@contextlib.asynccontextmanager
async def fake_google() -> AsyncIterator[FakeGoogle]:
    fake = FakeGoogle()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def push_env(fake: FakeGoogle, credentials: str | None = None) -> dict[str, str]:
    """Environment for a relay with push on against `fake`. NO_PROXY keeps a proxy set in
    the surrounding environment from capturing loopback requests."""
    return {
        "PYRYCODE_RELAY_FCM_CREDENTIALS": fake.credentials()
        if credentials is None
        else credentials,
        "NO_PROXY": "*",
        "no_proxy": "*",
    }
