"""ops.fcm: service-account parsing, the FCM request body, reply classification, and the
access-token cache and per-call timeout against the fake Google on loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pyrycode_relay.ops.fcm import (
    DEFAULT_TOKEN_URI,
    ERR_CREDENTIALS,
    CredentialsError,
    FcmClient,
    classify_reply,
    message_body,
    parse_service_account,
)
from pyrycode_relay.ops.push import token_fp
from tests.e2e.fake_google import (
    ACCESS_TOKEN,
    CLIENT_EMAIL,
    FakeGoogle,
    Reply,
    ec_pem,
    fake_google,
    pkcs1_pem,
    service_account,
)

SECRET = "s3cr3t-value"


def test_parse_valid_keys() -> None:
    for pem in (None, pkcs1_pem()):
        account = parse_service_account(service_account("http://127.0.0.1:1/token", pem))
        assert account.client_email == CLIENT_EMAIL
        assert account.token_uri == "http://127.0.0.1:1/token"
        assert "PRIVATE" not in repr(account)
    assert parse_service_account(service_account(None)).token_uri == DEFAULT_TOKEN_URI


def _with(**fields: Any) -> str:
    info = json.loads(service_account(None))
    info.update(fields)
    return json.dumps({k: v for k, v in info.items() if v is not ...})


@pytest.mark.parametrize(
    "text",
    [
        SECRET,
        "",
        "null",
        f'["{SECRET}"]',
        _with(type=SECRET),
        _with(type=...),
        _with(client_email=""),
        _with(client_email=...),
        _with(client_email=7),
        _with(private_key=...),
        _with(private_key=SECRET),
        _with(
            private_key=f"-----BEGIN RSA PRIVATE KEY-----\n{SECRET}\n-----END RSA PRIVATE KEY-----"
        ),
        _with(private_key=ec_pem()),
        _with(token_uri=7),
        _with(private_key_id=7),
    ],
)
def test_parse_refusals_never_carry_the_value(text: str) -> None:
    with pytest.raises(CredentialsError) as info:
        parse_service_account(text)
    assert str(info.value) == ERR_CREDENTIALS
    # no chained exception that a traceback could print (it might quote the key)
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_message_body_is_exact() -> None:
    assert message_body("T") == b'{"message":{"token":"T","android":{"priority":"HIGH"}}}'
    assert json.loads(message_body('a"b\\c'))["message"]["token"] == 'a"b\\c'


def test_token_fp() -> None:
    assert token_fp("T") == "e632b709"  # sha256("T")[:8]
    assert len(token_fp("x" * 1000)) == 8


def err_body(status: Any = None, code: Any = None, **extra: Any) -> bytes:
    error: dict[str, Any] = {"code": 400, "message": f"free text {SECRET}", **extra}
    if status is not None:
        error["status"] = status
    if code is not None:
        error["details"] = [{"@type": "x"}, {"errorCode": code}]
    return json.dumps({"error": error}).encode()


@pytest.mark.parametrize(
    ("status", "body", "outcome", "err"),
    [
        (
            404,
            err_body("NOT_FOUND", "UNREGISTERED"),
            "unregistered",
            "relay: fcm send failed: status 404 (NOT_FOUND, UNREGISTERED)",
        ),
        (
            400,
            err_body("INVALID_ARGUMENT", "UNREGISTERED"),
            "unregistered",
            "relay: fcm send failed: status 400 (INVALID_ARGUMENT, UNREGISTERED)",
        ),
        (
            400,
            err_body("INVALID_ARGUMENT", "INVALID_ARGUMENT"),
            "send_failed",
            "relay: fcm send failed: status 400 (INVALID_ARGUMENT, INVALID_ARGUMENT)",
        ),
        (
            403,
            err_body("PERMISSION_DENIED"),
            "send_failed",
            "relay: fcm send failed: status 403 (PERMISSION_DENIED)",
        ),
        (
            500,
            err_body(None, "INTERNAL"),
            "send_failed",
            "relay: fcm send failed: status 500 (INTERNAL)",
        ),
        (
            400,
            err_body(f"BAD {SECRET}", f"x={SECRET}"),
            "send_failed",
            "relay: fcm send failed: status 400",
        ),
        (
            400,
            err_body("A" * 65, "unregistered"),
            "send_failed",
            "relay: fcm send failed: status 400",
        ),
        (400, err_body(7, 8), "send_failed", "relay: fcm send failed: status 400"),
        (302, b"", "send_failed", "relay: fcm send failed: status 302"),
        (503, b"<html>" + SECRET.encode(), "send_failed", "relay: fcm send failed: status 503"),
        (
            404,
            b'{"error":"' + SECRET.encode() + b'"}',
            "send_failed",
            "relay: fcm send failed: status 404",
        ),
        (
            404,
            err_body("NOT_FOUND", "UNREGISTERED")[:40],
            "send_failed",
            "relay: fcm send failed: status 404",
        ),
    ],
)
def test_classify_failures(status: int, body: bytes, outcome: str, err: str) -> None:
    result = classify_reply(status, body, "T")
    assert (result.outcome, result.err, result.message_id) == (outcome, err, None)


@pytest.mark.parametrize(
    ("body", "message_id"),
    [
        (b'{"name":"projects/p/messages/0:1%2_a-B"}', "projects/p/messages/0:1%2_a-B"),
        (json.dumps({"name": "n" * 256}).encode(), "n" * 256),
        (json.dumps({"name": "n" * 257}).encode(), None),
        (b'{"name":"a b"}', None),
        (b'{"name":"a=b"}', None),
        (b'{"name":"a\\"b"}', None),
        (b'{"name":""}', None),
        (b'{"name":7}', None),
        (b'{"name":"x/TOKEN/y"}', None),  # echoes the device token
        (b"", None),
        (b"[]", None),
    ],
)
def test_classify_success(body: bytes, message_id: str | None) -> None:
    result = classify_reply(200, body, "TOKEN")
    assert (result.outcome, result.err, result.message_id) == ("sent", "", message_id)


# -- FcmClient against the fake ------------------------------------------------------------


async def client(fake: FakeGoogle, timeout: float = 10.0) -> FcmClient:
    return FcmClient(parse_service_account(fake.credentials()), fake.url, timeout=timeout)


async def test_token_cached_and_shared() -> None:
    async with fake_google() as fake:
        c = await client(fake)
        try:
            results = await asyncio.gather(*(c.send(f"t{i}") for i in range(5)))
            assert [r.outcome for r in results] == ["sent"] * 5
            await c.send("later")
            assert len(fake.token_requests()) == 1
        finally:
            await c.aclose()


async def test_token_refetched_near_expiry() -> None:
    async with fake_google() as fake:
        fake.token_reply = Reply(200, b'{"access_token":"short","expires_in":30}')
        c = await client(fake)
        try:
            await c.send("a")
            await c.send("b")  # 30 s is inside the refresh margin: fetched again
            assert len(fake.token_requests()) == 2
            assert fake.sends()[0].headers["authorization"] == "Bearer short"
        finally:
            await c.aclose()


@pytest.mark.parametrize(
    ("reply", "err"),
    [
        (
            Reply(401, b'{"error":"invalid_grant"}'),
            "relay: fcm access-token fetch failed: status 401",
        ),
        (
            Reply(302, b"", [("Location", "/token2")]),
            "relay: fcm access-token fetch failed: status 302",
        ),
        (
            Reply(200, b'{"token_type":"Bearer"}'),
            "relay: fcm access-token fetch failed: no access_token in the reply",
        ),
        (
            Reply(200, b"not json"),
            "relay: fcm access-token fetch failed: no access_token in the reply",
        ),
    ],
)
async def test_token_failures(reply: Reply, err: str) -> None:
    async with fake_google() as fake:
        fake.token_reply = reply
        c = await client(fake)
        try:
            results = await asyncio.gather(c.send("a"), c.send("b"))
            assert {(r.outcome, r.err) for r in results} == {("token_fetch_failed", err)}
            assert len(fake.token_requests()) == 1  # both waiters shared the failed fetch
            assert fake.sends() == []
            fake.token_reply = Reply(200, json.dumps({"access_token": ACCESS_TOKEN}).encode())
            assert (await c.send("c")).outcome == "sent"  # the next wake fetches afresh
        finally:
            await c.aclose()


async def test_timeouts_bound_each_call() -> None:
    async with fake_google() as fake:
        fake.replies["slow"] = Reply(hang=True)
        c = await client(fake, timeout=0.3)
        try:
            result = await c.send("slow")
            assert (result.outcome, result.err) == (
                "send_failed",
                "relay: fcm send failed: timeout",
            )
            fake.token_reply = Reply(hang=True)
            c2 = await client(fake, timeout=0.3)
            try:
                result = await c2.send("x")
                assert result.outcome == "token_fetch_failed"
                assert result.err == "relay: fcm access-token fetch failed: timeout"
            finally:
                await c2.aclose()
        finally:
            await c.aclose()


async def test_unreachable_endpoint_reports_class_name_only() -> None:
    async with fake_google() as fake:
        c = FcmClient(parse_service_account(fake.credentials()), "http://127.0.0.1:1")
        try:
            result = await c.send("x")
            assert (result.outcome, result.err) == (
                "send_failed",
                "relay: fcm send failed: ConnectError",
            )
        finally:
            await c.aclose()
