"""Conformance §15 G: push wake through FCM (scenarios 54-61) and scenario 82 (credentials at
boot), against a fake OAuth2 + FCM server on loopback (tests.e2e.fake_google)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tests.e2e.fake_google import (
    ACCESS_TOKEN,
    CLIENT_EMAIL,
    KEY_ID,
    SEND_PATH,
    FakeGoogle,
    Reply,
    ec_pem,
    fake_google,
    fcm_error,
    pkcs1_pem,
    push_env,
    rsa_key,
    service_account,
)
from tests.e2e.harness import Relay, binary, paired, recv_json, run_relay, start_relay

MARK = "zq7v"  # in every device token and hostile reply below; must never reach the logs
OUTCOMES = ("dropped", "send_failed", "sent", "token_fetch_failed", "unregistered")
DROPPED = "msg=binary_forwarder_push_wake_dropped"
SENT = "msg=push_wake_sent"
FAILED = "msg=push_wake_send_failed"


def tok(name: str) -> str:
    return f"fcm-{name}-{MARK}:APA91b_device_token"


def wake(token: str, platform: str = "fcm") -> str:
    return json.dumps({"push_wake": {"platform": platform, "token": token}})


def fp(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def series(outcome: str) -> str:
    return f'pyrycode_relay_push_wakes_total{{outcome="{outcome}"}}'


async def outcomes(relay: Relay) -> dict[str, float]:
    m = await relay.metrics()
    return {o: m[series(o)] for o in OUTCOMES}


async def wait_outcomes(relay: Relay, expected: dict[str, float], timeout: float = 5.0) -> None:
    want = dict.fromkeys(OUTCOMES, 0.0) | expected
    async with asyncio.timeout(timeout):
        while (got := await outcomes(relay)) != want:
            if any(got[o] > want[o] for o in OUTCOMES):
                raise AssertionError(f"outcomes {got}, expected {want}")
            await asyncio.sleep(0.02)


async def wait_count(relay: Relay, needle: str, n: int, timeout: float = 5.0) -> list[str]:
    """Waits until `n` log lines contain `needle` (failing on more); returns them."""
    async with asyncio.timeout(timeout):
        while relay.count_log(needle) < n:
            await asyncio.sleep(0.01)
    lines = [line for line in relay.lines if needle in line]
    assert len(lines) == n, lines
    return lines


def assert_no_secrets(relay: Relay, *extra: str) -> None:
    log = relay.log
    key_body = rsa_key_marker()
    for secret in (MARK, ACCESS_TOKEN, key_body, "BEGIN PRIVATE KEY", *extra):
        assert secret not in log, secret


def rsa_key_marker() -> str:
    """A line from the middle of the PEM: if any part of the key leaked, this would."""
    from tests.e2e.fake_google import pkcs8_pem

    return pkcs8_pem().splitlines()[5]


@contextlib.asynccontextmanager
async def push_relay(
    *flags: str, credentials: str | None = None
) -> AsyncIterator[tuple[Relay, FakeGoogle]]:
    async with fake_google() as fake:
        env = push_env(fake, credentials)
        async with start_relay(f"--fcm-endpoint={fake.url}", *flags, env=env) as relay:
            yield relay, fake
            assert_no_secrets(relay)


# -- 54: off the read loop ------------------------------------------------------------


async def test_wake_dispatched_off_read_loop() -> None:  # G54
    async with push_relay() as (relay, fake):
        t = tok("hang")
        fake.replies[t] = Reply(hang=True)
        b, p, cid = await paired(relay, "s1")
        await b.send(wake(t))
        await fake.wait_sends(1)  # the send is now pending at "FCM"
        await b.send(json.dumps({"conn_id": cid, "frame": {"after": "wake"}}))
        assert await recv_json(p) == {"after": "wake"}
        assert relay.count_log(SENT) == relay.count_log(FAILED) == 0  # still pending
        fake.release(t)
        line = await relay.wait_log(SENT)
        assert f"token_fp={fp(t)}" in line and "server_id=s1" in line
        assert fake.sent_tokens() == [t]  # exactly one send
        await wait_outcomes(relay, {"sent": 1})
        await b.close()
        await p.close()


# -- 55, 56: refused shapes, conn_id + push_wake ----------------------------------------


REFUSED = [
    (wake(tok("apns"), "apns"), "relay: push_wake platform not supported"),
    (wake(tok("webpush"), "webpush"), "relay: push_wake platform not supported"),
    (wake(tok("empty-platform"), ""), "relay: push_wake platform not supported"),
    (
        json.dumps({"push_wake": {"token": tok("no-platform")}}),
        "relay: push_wake platform not supported",
    ),
    (wake(""), "relay: push_wake token is empty"),
    ('{"push_wake":{"platform":"fcm"}}', "relay: push_wake token is empty"),
    (json.dumps({"push_wake": [tok("array")]}), "relay: malformed push_wake"),
    ('{"push_wake":7}', "relay: malformed push_wake"),
    (json.dumps({"push_wake": {"platform": "fcm", "token": 5}}), "relay: malformed push_wake"),
]


async def test_refused_wakes_drop_and_continue() -> None:  # G55
    async with push_relay() as (relay, fake):
        b, p, cid = await paired(relay, "s1")
        for i, (message, err) in enumerate(REFUSED):
            await b.send(message)
            await b.send(json.dumps({"conn_id": cid, "frame": {"n": i}}))
            assert await recv_json(p) == {"n": i}  # the binary stays up; next frame routed
            line = (await wait_count(relay, DROPPED, i + 1))[-1]
            assert f'err="{err}"' in line
            assert (
                DROPPED in line and "server_id=s1" in line and "binary_conn_id=server-s1-" in line
            )
        assert relay.count_log(DROPPED) == len(REFUSED)
        # refusals before the rate limit are not counted; nothing reached FCM
        assert await outcomes(relay) == dict.fromkeys(OUTCOMES, 0.0)
        assert fake.requests == []


async def test_invalid_utf8_in_binary_opcode_messages_is_dropped() -> None:  # §3.5, §7.7
    # A binary-opcode message skips the text-frame UTF-8 check; invalid UTF-8 inside a decoded
    # string once escaped the envelope decoder as UnicodeDecodeError and killed the binary.
    async with push_relay() as (relay, fake):
        b, p, cid = await paired(relay, "s1")
        await b.send(b'{"conn_id":"\xff","frame":1}')
        await b.send(b'{"push_wake":{"platform":"fcm","token":"\xff"}}')
        await b.send(json.dumps({"conn_id": cid, "frame": "still up"}))
        assert await recv_json(p) == "still up"
        await relay.wait_log('err="relay: malformed routing envelope"')
        await relay.wait_log('err="relay: malformed push_wake"')
        assert "internal error" not in relay.log
        assert fake.requests == []


async def test_push_off_refuses_even_malformed_wakes() -> None:  # G55 push off, §12 step 1
    async with start_relay() as relay:
        b, p, cid = await paired(relay, "s1")
        for message in (wake(tok("off")), '{"push_wake":["x"]}', wake(tok("apns"), "apns")):
            await b.send(message)
        await b.send(json.dumps({"conn_id": cid, "frame": 1}))
        assert await recv_json(p) == 1
        await wait_count(relay, 'err="relay: push is off"', 3)
        assert relay.count_log("push off: PYRYCODE_RELAY_FCM_CREDENTIALS unset") == 1
        assert not any(k.startswith("pyrycode_relay_push") for k in await relay.metrics())
        assert MARK not in relay.log


async def test_conn_id_with_push_wake_is_routed_not_sent() -> None:  # G56
    async with push_relay() as (relay, fake):
        b, p, cid = await paired(relay, "s1")
        ignored = tok("ignored")
        await b.send(
            json.dumps(
                {
                    "conn_id": cid,
                    "frame": {"x": 1},
                    "push_wake": {"platform": "fcm", "token": ignored},
                }
            )
        )
        assert await recv_json(p) == {"x": 1}
        # A later wake is sent; being ordered after it, the first one would have been too.
        later = tok("later")
        await b.send(wake(later))
        await relay.wait_log(SENT)
        assert fake.sent_tokens() == [later]
        assert relay.count_log(DROPPED) == 0


# -- 57, 58: per-server-id rate, in-flight cap ------------------------------------------


async def test_per_server_id_rate_limit() -> None:  # G57
    async with push_relay("--push-interval=1h") as (relay, fake):
        b1 = await binary(relay, "s1")
        b2 = await binary(relay, "s2")
        await relay.wait_counts(2, 0)
        for i in range(7):
            await b1.send(wake(tok(f"s1-{i}")))
        line = await relay.wait_log(DROPPED)
        assert 'err="relay: push_wake rate-limited for server-id"' in line
        assert "server_id=s1" in line
        await wait_outcomes(relay, {"sent": 6, "dropped": 1})
        await b2.send(wake(tok("s2")))  # another server-id has its own bucket
        await wait_outcomes(relay, {"sent": 7, "dropped": 1})
        assert sorted(fake.sent_tokens()) == sorted(
            [tok(f"s1-{i}") for i in range(6)] + [tok("s2")]
        )
        assert relay.count_log(DROPPED) == 1


async def test_in_flight_cap() -> None:  # G58
    async with push_relay("--push-max-in-flight=2") as (relay, fake):
        h1, h2 = tok("h1"), tok("h2")
        fake.replies[h1] = Reply(hang=True)
        fake.replies[h2] = Reply(hang=True)
        b = await binary(relay, "s1")
        await relay.wait_counts(1, 0)
        await b.send(wake(h1))
        await b.send(wake(h2))
        await fake.wait_sends(2)
        await b.send(wake(tok("over")))
        line = await relay.wait_log(DROPPED)
        assert 'err="relay: push_wake in-flight cap reached"' in line
        await wait_outcomes(relay, {"dropped": 1})
        fake.release(h1)
        await wait_outcomes(relay, {"dropped": 1, "sent": 1})
        after = tok("after")
        await b.send(wake(after))  # a slot is free again
        await wait_outcomes(relay, {"dropped": 1, "sent": 2})
        assert sorted(fake.sent_tokens()) == sorted([h1, h2, after])
        # both hanging sends shared a single token fetch
        assert len(fake.token_requests()) == 1
        fake.release(h2)
        await wait_outcomes(relay, {"dropped": 1, "sent": 3})


# -- 59: outcomes -----------------------------------------------------------------------


async def test_outcome_counters_and_log_lines() -> None:  # G59
    async with push_relay() as (relay, fake):
        m = await relay.metrics()
        push_series = sorted(k for k in m if k.startswith("pyrycode_relay_push"))
        assert push_series == sorted(series(o) for o in OUTCOMES)  # all five, at 0
        assert all(m[k] == 0 for k in push_series)

        ok, unreg, bad, redir = tok("ok"), tok("unreg"), tok("bad"), tok("redir")
        fake.replies[unreg] = fcm_error(404, "UNREGISTERED", "NOT_FOUND")
        fake.replies[bad] = fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")
        fake.replies[redir] = Reply(302, b"", headers=[("Location", fake.url + "/elsewhere")])
        b = await binary(relay, "s1")
        await relay.wait_counts(1, 0)
        for t in (ok, unreg, bad, redir):
            await b.send(wake(t))
            await wait_count(relay, "msg=push_wake_s", len(fake.sent_tokens()))
        await wait_outcomes(relay, {"sent": 1, "unregistered": 1, "send_failed": 2})

        sent = await relay.wait_log(SENT)
        assert "level=INFO" in sent and f"token_fp={fp(ok)}" in sent
        assert "fcm_message_id=projects/pyrycode-mobile/messages/0:1700000000%abc_DEF-12" in sent
        assert "duration_ms=" in sent
        failed = {
            fp(t): line
            for t in (unreg, bad, redir)
            for line in relay.lines
            if f"token_fp={fp(t)}" in line
        }
        assert (
            'err="relay: fcm send failed: status 404 (NOT_FOUND, UNREGISTERED)"'
            in failed[fp(unreg)]
        )
        assert (
            'err="relay: fcm send failed: status 400 (INVALID_ARGUMENT, INVALID_ARGUMENT)"'
            in failed[fp(bad)]
        )
        assert 'err="relay: fcm send failed: status 302"' in failed[fp(redir)]
        for line in failed.values():
            assert FAILED in line and "level=WARN" in line and "server_id=s1" in line
        assert [r.path for r in fake.sends()] == [SEND_PATH] * 4  # the redirect not followed
        # no series carries a server-id or token
        assert all("s1" not in k and MARK not in k for k in await relay.metrics())


async def test_token_endpoint_failure() -> None:  # G59 token_fetch_failed
    async with fake_google() as fake:
        fake.token_reply = Reply(
            401, f'{{"error":"invalid_grant","error_description":"{MARK}"}}'.encode()
        )
        async with start_relay(f"--fcm-endpoint={fake.url}", env=push_env(fake)) as relay:
            b = await binary(relay, "s1")
            await relay.wait_counts(1, 0)
            await b.send(wake(tok("t")))
            line = await relay.wait_log(FAILED)
            assert 'err="relay: fcm access-token fetch failed: status 401"' in line
            await wait_outcomes(relay, {"token_fetch_failed": 1})
            assert fake.sends() == []
            assert_no_secrets(relay)


# -- 60: request shape, token exchange and caching ----------------------------------------


def b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


async def test_request_shape_and_token_caching() -> None:  # G60
    async with push_relay() as (relay, fake):
        b = await binary(relay, "s1")
        await relay.wait_counts(1, 0)
        tokens = [tok(f"shape-{i}") for i in range(3)]
        for t in tokens:  # back to back: concurrent sends share one token fetch
            await b.send(wake(t))
        await wait_outcomes(relay, {"sent": 3})
        later = tok("later")
        await b.send(wake(later))
        await wait_outcomes(relay, {"sent": 4})
        assert len(fake.token_requests()) == 1  # cached for the later send too

        (token_req,) = fake.token_requests()
        assert token_req.method == "POST"
        assert token_req.headers["content-type"] == "application/x-www-form-urlencoded"
        form = token_req.form
        assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        header_b64, claims_b64, sig_b64 = form["assertion"][0].split(".")
        header = json.loads(b64url(header_b64))
        claims = json.loads(b64url(claims_b64))
        assert header == {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
        assert claims["iss"] == CLIENT_EMAIL
        assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
        assert claims["aud"] == fake.token_uri
        assert claims["exp"] - claims["iat"] == 3600
        assert abs(claims["iat"] - time.time()) < 60
        rsa_key().public_key().verify(  # raises if the signature is wrong
            b64url(sig_b64),
            f"{header_b64}.{claims_b64}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )

        sends = fake.sends()
        assert sorted(r.device_token for r in sends) == sorted([*tokens, later])
        for r in sends:
            assert r.method == "POST" and r.path == "/v1/projects/pyrycode-mobile/messages:send"
            t = r.device_token
            assert (
                r.body == b'{"message":{"token":"%s","android":{"priority":"HIGH"}}}' % t.encode()
            )
            assert r.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
            assert r.headers["content-type"] == "application/json"


async def test_pkcs1_key_accepted() -> None:  # §9.2: PKCS#8, then PKCS#1
    async with fake_google() as fake:
        creds = service_account(fake.token_uri, pkcs1_pem())
        async with start_relay(f"--fcm-endpoint={fake.url}", env=push_env(fake, creds)) as relay:
            b = await binary(relay, "s1")
            await relay.wait_counts(1, 0)
            await b.send(wake(tok("p1")))
            await wait_outcomes(relay, {"sent": 1})


# -- 61: hostile replies ------------------------------------------------------------------


async def test_hostile_fcm_replies_never_reach_logs() -> None:  # G61
    async with push_relay("--push-burst=20") as (relay, fake):
        names = [
            f"{MARK} with spaces",
            f'{MARK}="quoted"',
            f"id{MARK}=x",
            "m" + MARK * 64,  # safe characters, but longer than 256
        ]
        hostile = [tok(f"name{i}") for i in range(len(names))]
        for t, name in zip(hostile, names, strict=True):
            fake.replies[t] = Reply(200, json.dumps({"name": name}).encode())
        # The device token echoed back as `name`: every character of it is in the safe set,
        # so only the relay's own check keeps it out of the log.
        echo = tok("echo")
        fake.replies[echo] = Reply(200, json.dumps({"name": echo}).encode())
        hostile.append(echo)
        err_tok = tok("err")
        fake.replies[err_tok] = Reply(
            400,
            json.dumps(
                {
                    "error": {
                        "code": 400,
                        "message": f'token {err_tok} "{MARK}" = bad',
                        "status": f"BAD {MARK}=1",
                        "details": [{"errorCode": f"UNREGISTERED_{MARK}"}],
                    }
                }
            ).encode(),
        )
        endless = tok("endless")
        fake.replies[endless] = Reply(200, b'{"name":"projects/p/messages/42"}', endless=True)
        b = await binary(relay, "s1")
        await relay.wait_counts(1, 0)
        for t in hostile:
            await b.send(wake(t))
        await wait_outcomes(relay, {"sent": len(hostile)})
        await b.send(wake(err_tok))
        await b.send(wake(endless))  # the reply never ends: only its first 4 KiB are read
        await wait_outcomes(relay, {"sent": len(hostile) + 1, "send_failed": 1}, timeout=4)
        line = await relay.wait_log(f"token_fp={fp(err_tok)}")
        assert 'err="relay: fcm send failed: status 400"' in line  # no unsafe enum shown
        for t in hostile:
            sent = await relay.wait_log(f"token_fp={fp(t)}")
            assert "fcm_message_id" not in sent
        assert "fcm_message_id=projects/p/messages/42" in await relay.wait_log(
            f"token_fp={fp(endless)}"
        )
        assert "BAD" not in line and "message" not in line


# -- shutdown, boot ----------------------------------------------------------------------


async def test_shutdown_cancels_in_flight_send() -> None:  # §11 step 4
    async with push_relay() as (relay, fake):
        t = tok("shutdown")
        fake.replies[t] = Reply(hang=True)
        b = await binary(relay, "s1")
        await relay.wait_counts(1, 0)
        await b.send(wake(t))
        await fake.wait_sends(1)
        started = time.monotonic()
        assert await relay.stop() == 0
        assert time.monotonic() - started < 5  # not the 10 s FCM timeout
        line = await relay.wait_log(FAILED)
        assert 'err="relay: fcm send failed: cancelled by shutdown"' in line
        assert f"token_fp={fp(t)}" in line
        assert relay.log.index("shutdown complete") < relay.log.index(FAILED)


BAD_CREDENTIALS = [
    f"garbage-{MARK}",
    "",
    "{}",
    f'["{MARK}"]',
    service_account(None, type=f"user-{MARK}"),
    service_account(None, client_email=""),
    service_account(
        None, private_key=f"-----BEGIN PRIVATE KEY-----\n{MARK}\n-----END PRIVATE KEY-----\n"
    ),
    service_account(None, private_key=ec_pem()),
    json.dumps(json.loads(service_account(None)) | {"token_uri": 7}),
]


@pytest.mark.parametrize("value", BAD_CREDENTIALS)
async def test_bad_credentials_refuse_boot(value: str) -> None:  # I82
    code, out = await run_relay(
        "--insecure-listen=127.0.0.1:8080", env={"PYRYCODE_RELAY_FCM_CREDENTIALS": value}
    )
    assert code == 2, out
    assert "refusing to start: invalid env-var config" in out
    assert "env_var=PYRYCODE_RELAY_FCM_CREDENTIALS" in out
    assert "not a service-account JSON key (value withheld)" in out
    assert MARK not in out and "PRIVATE KEY" not in out and CLIENT_EMAIL not in out


async def test_valid_credentials_mean_push_on() -> None:  # I82 counterpart
    async with push_relay() as (relay, _fake):
        assert "push off" not in relay.log
        assert CLIENT_EMAIL not in relay.log
