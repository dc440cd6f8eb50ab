"""Push-wake admission (reference §12 steps 1-6): order of checks, texts, counting."""

from __future__ import annotations

import pytest

from pyrycode_relay.core.push_admission import (
    ERR_EMPTY_TOKEN,
    ERR_IN_FLIGHT,
    ERR_MALFORMED,
    ERR_PLATFORM,
    ERR_PUSH_OFF,
    ERR_RATE_LIMITED,
    PushAdmission,
    parse_push_wake,
)
from tests.clock import ManualClock

GOOD = b'{"platform":"fcm","token":"T"}'


def admission(
    *, enabled: bool = True, burst: int = 6, interval: float = 10.0, max_in_flight: int = 32
) -> tuple[PushAdmission, ManualClock]:
    clock = ManualClock()
    a = PushAdmission(
        enabled=enabled, burst=burst, interval=interval, max_in_flight=max_in_flight, clock=clock
    )
    return a, clock


def test_admitted_wake_carries_token_and_counts_in_flight() -> None:
    a, _ = admission()
    d = a.admit("s1", GOOD)
    assert d.token == "T" and d.err == "" and not d.dropped
    assert a.in_flight == 1
    a.release()
    assert a.in_flight == 0
    with pytest.raises(RuntimeError):
        a.release()


@pytest.mark.parametrize(
    ("raw", "err"),
    [
        (b'["T"]', ERR_MALFORMED),
        (b"7", ERR_MALFORMED),
        (b'"fcm"', ERR_MALFORMED),
        (b'{"platform":"fcm","token":5}', ERR_MALFORMED),
        (b'{"platform":"fcm","token":null}', ERR_MALFORMED),
        (b'{"platform":"fcm","token":{"a":"b"}}', ERR_MALFORMED),
        (b'{"platform":"apns","token":"T"}', ERR_PLATFORM),
        (b'{"platform":"webpush","token":"T"}', ERR_PLATFORM),
        (b'{"platform":"FCM","token":"T"}', ERR_PLATFORM),
        (b'{"platform":"","token":"T"}', ERR_PLATFORM),
        (b'{"token":"T"}', ERR_PLATFORM),
        (b"{}", ERR_PLATFORM),
        (b'{"platform":"apns","token":""}', ERR_PLATFORM),  # platform before token
        (b'{"platform":"fcm","token":""}', ERR_EMPTY_TOKEN),
        (b'{"platform":"fcm"}', ERR_EMPTY_TOKEN),
    ],
)
def test_refusals_in_order_and_not_counted(raw: bytes, err: str) -> None:
    a, _ = admission(burst=1)
    d = a.admit("s1", raw)
    assert d.token is None and d.err == err and not d.dropped
    assert a.in_flight == 0
    assert a.admit("s1", GOOD).token == "T"  # a refused shape spent no token


def test_extra_string_fields_are_ignored() -> None:
    a, _ = admission()
    assert a.admit("s1", b'{"platform":"fcm","token":"T","x":"y"}').token == "T"


def test_push_off_comes_first() -> None:
    a, _ = admission(enabled=False)
    for raw in (GOOD, b"[1]", b'{"platform":"apns","token":""}'):
        d = a.admit("s1", raw)
        assert d.err == ERR_PUSH_OFF and not d.dropped


def test_closed_reports_push_off_after_shape_checks() -> None:
    a, _ = admission()
    a.close()
    assert a.admit("s1", GOOD).err == ERR_PUSH_OFF
    assert a.admit("s1", b"[1]").err == ERR_MALFORMED  # step 2 still precedes step 4a
    assert a.in_flight == 0


def test_rate_limit_per_server_id() -> None:
    a, clock = admission(burst=6, interval=10.0)
    for _ in range(6):
        assert a.admit("s1", GOOD).token == "T"
        a.release()
    d = a.admit("s1", GOOD)
    assert d.err == ERR_RATE_LIMITED and d.dropped
    assert a.admit("s2", GOOD).token == "T"  # its own bucket
    clock.advance(9.9)
    assert a.admit("s1", GOOD).err == ERR_RATE_LIMITED
    clock.advance(0.1)
    assert a.admit("s1", GOOD).token == "T"  # one token per interval
    assert a.admit("s1", GOOD).err == ERR_RATE_LIMITED


def test_in_flight_cap_is_relay_wide() -> None:
    a, _ = admission(burst=10, max_in_flight=2)
    assert a.admit("s1", GOOD).token and a.admit("s2", GOOD).token
    d = a.admit("s3", GOOD)
    assert d.err == ERR_IN_FLIGHT and d.dropped
    a.release()
    assert a.admit("s3", GOOD).token == "T"
    assert a.in_flight == 2


def test_rate_limit_checked_before_in_flight_cap() -> None:
    a, _ = admission(burst=1, max_in_flight=1)
    assert a.admit("s1", GOOD).token
    assert a.admit("s1", GOOD).err == ERR_RATE_LIMITED
    assert a.admit("s2", GOOD).err == ERR_IN_FLIGHT


def test_sweep_drops_idle_buckets() -> None:
    a, clock = admission(burst=6, interval=10.0)
    a.admit("s1", GOOD)
    a.admit("s2", GOOD)
    assert a.buckets() == 2
    clock.advance(59)
    a.admit("s2", GOOD)
    clock.advance(1)
    assert a.sweep() == 1  # s1 idle for burst*interval; s2 seen a second ago
    assert a.buckets() == 1


def test_parse_push_wake() -> None:
    assert parse_push_wake(b'{"platform":"fcm","token":"T"}') == {"platform": "fcm", "token": "T"}
    assert parse_push_wake(b'{"a":"\xff"}') is None  # invalid UTF-8
    assert parse_push_wake(b"{") is None


def test_invalid_limits_rejected() -> None:
    with pytest.raises(ValueError):
        admission(burst=0)
    with pytest.raises(ValueError):
        admission(max_in_flight=0)
