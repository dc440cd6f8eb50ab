"""ops.push: the waker around admission — one task per admitted wake, exactly one log line
and one count per wake, cancellation at shutdown (reference §12, §11 step 4)."""

from __future__ import annotations

import asyncio
import io

from pyrycode_relay.core.config import parse_args
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.push import PushWaker, SendResult
from tests.clock import ManualClock

WAKE = b'{"platform":"fcm","token":"T"}'
FP_T = "e632b709"


class FakeSender:
    """Each send waits for the test to answer it."""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[SendResult]] = {}
        self.started = asyncio.Event()
        self.closed = False

    async def send(self, token: str) -> SendResult:
        fut: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self.pending[token] = fut
        self.started.set()
        return await fut

    async def aclose(self) -> None:
        self.closed = True


class BrokenSender(FakeSender):
    async def send(self, token: str) -> SendResult:
        raise KeyError(token)  # the text (the token) must not reach the log


def waker(sender: FakeSender | None, *flags: str) -> tuple[PushWaker, io.StringIO, ManualClock]:
    buf = io.StringIO()
    clock = ManualClock()
    config = parse_args(["--insecure-listen=127.0.0.1:1", *flags], {})
    waker = PushWaker(
        Logger(buf),
        sender,
        burst=config.push_burst,
        interval=config.push_interval,
        max_in_flight=config.push_max_in_flight,
        clock=clock,
    )
    return waker, buf, clock


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


async def settle(w: PushWaker) -> None:
    while w.in_flight:
        await asyncio.sleep(0)


async def test_wake_returns_at_once_and_sends_in_background() -> None:
    sender = FakeSender()
    w, buf, clock = waker(sender)
    w.wake("s1", "server-s1-1", WAKE)  # synchronous: nothing awaited
    assert w.in_flight == 1 and w.admission.in_flight == 1
    await sender.started.wait()
    clock.advance(0.25)
    sender.pending["T"].set_result(SendResult("sent", message_id="m/1"))
    await settle(w)
    assert w.admission.in_flight == 0
    assert w.outcomes == {
        "sent": 1,
        "unregistered": 0,
        "token_fetch_failed": 0,
        "send_failed": 0,
        "dropped": 0,
    }
    (line,) = lines(buf)
    assert "level=INFO msg=push_wake_sent server_id=s1" in line
    assert f"token_fp={FP_T} duration_ms=250 fcm_message_id=m/1" in line
    await w.close()


async def test_each_outcome_one_line_one_count() -> None:
    sender = FakeSender()
    w, buf, _ = waker(sender, "--push-burst=10")
    results = {
        "a": SendResult("sent"),
        "b": SendResult(
            "unregistered", "relay: fcm send failed: status 404 (NOT_FOUND, UNREGISTERED)"
        ),
        "c": SendResult("token_fetch_failed", "relay: fcm access-token fetch failed: status 401"),
        "d": SendResult("send_failed", "relay: fcm send failed: status 400"),
    }
    for token in results:
        w.wake("s1", "b1", b'{"platform":"fcm","token":"%s"}' % token.encode())
    while len(sender.pending) < 4:
        await asyncio.sleep(0)
    for token, result in results.items():
        sender.pending[token].set_result(result)
    await settle(w)
    assert w.outcomes == {
        "sent": 1,
        "unregistered": 1,
        "token_fetch_failed": 1,
        "send_failed": 1,
        "dropped": 0,
    }
    out = lines(buf)
    assert len(out) == 4
    assert sum("msg=push_wake_sent" in x and "fcm_message_id" not in x for x in out) == 1
    failed = [x for x in out if "level=WARN msg=push_wake_send_failed" in x]
    assert len(failed) == 3
    assert all("err=" in x and "duration_ms=" in x for x in failed)
    await w.close()


async def test_refusals_logged_and_only_limits_counted() -> None:
    sender = FakeSender()
    w, buf, _ = waker(sender, "--push-burst=1", "--push-max-in-flight=1")
    w.wake("s1", "b1", b'{"platform":"apns","token":"T"}')
    w.wake("s1", "b1", WAKE)  # admitted
    w.wake("s1", "b1", WAKE)  # rate-limited
    w.wake("s2", "b2", WAKE)  # in-flight cap
    assert w.outcomes["dropped"] == 2
    out = lines(buf)
    assert len(out) == 3
    assert 'err="relay: push_wake platform not supported"' in out[0]
    assert 'err="relay: push_wake rate-limited for server-id"' in out[1]
    assert "server_id=s2 binary_conn_id=b2" in out[2] and "in-flight cap reached" in out[2]
    assert all("msg=binary_forwarder_push_wake_dropped" in x for x in out)
    await w.close()


async def test_close_cancels_running_and_unstarted_sends() -> None:
    sender = FakeSender()
    w, buf, _ = waker(sender, "--push-burst=10")
    w.wake("s1", "b1", b'{"platform":"fcm","token":"running"}')
    await sender.started.wait()
    w.wake("s1", "b1", b'{"platform":"fcm","token":"unstarted"}')  # never gets to run
    await w.close()
    assert sender.closed and w.in_flight == 0 and w.admission.in_flight == 0
    assert w.outcomes["send_failed"] == 2
    failed = [x for x in lines(buf) if "msg=push_wake_send_failed" in x]
    assert len(failed) == 2
    assert all('err="relay: fcm send failed: cancelled by shutdown"' in x for x in failed)
    w.wake("s1", "b1", WAKE)  # after close: push is off
    assert 'err="relay: push is off"' in lines(buf)[-1]
    assert w.outcomes["send_failed"] == 2 and w.outcomes["dropped"] == 0


async def test_sender_bug_still_ends_the_wake() -> None:
    w, buf, _ = waker(BrokenSender())
    w.wake("s1", "b1", WAKE)
    await settle(w)
    assert w.outcomes["send_failed"] == 1 and w.admission.in_flight == 0
    (line,) = lines(buf)
    assert 'err="relay: fcm send failed: KeyError"' in line and "'T'" not in line
    await w.close()


async def test_disabled_waker() -> None:
    w, buf, _ = waker(None)
    assert not w.enabled
    w.wake("s1", "b1", b"[1]")
    assert 'err="relay: push is off"' in lines(buf)[0] and w.in_flight == 0
    await w.close()
