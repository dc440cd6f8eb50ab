from __future__ import annotations

import pytest

from pyrycode_relay.core.ratelimit import TokenBucketLimiter
from tests.clock import ManualClock


def make(burst: int = 20, interval: float = 6.0) -> tuple[TokenBucketLimiter, ManualClock]:
    clock = ManualClock()
    return TokenBucketLimiter(burst, interval, clock), clock


def drain(lim: TokenBucketLimiter, key: str = "1.2.3.4") -> int:
    n = 0
    while lim.allow(key):
        n += 1
        assert n < 1000
    return n


def test_burst_then_deny() -> None:
    lim, _ = make()
    assert [lim.allow("a") for _ in range(21)] == [True] * 20 + [False]


def test_one_token_per_interval() -> None:
    lim, clock = make()
    assert drain(lim) == 20
    clock.advance(5.999)
    assert not lim.allow("1.2.3.4")
    clock.advance(0.001)
    assert lim.allow("1.2.3.4")
    assert not lim.allow("1.2.3.4")


def test_fraction_of_interval_carries_over() -> None:
    lim, clock = make()
    drain(lim)
    clock.advance(3)
    assert not lim.allow("1.2.3.4")  # half an interval: nothing yet, but the time is kept
    clock.advance(3)
    assert lim.allow("1.2.3.4")
    clock.advance(9)  # 1.5 intervals: one token, half carried
    assert lim.allow("1.2.3.4")
    assert not lim.allow("1.2.3.4")
    clock.advance(3)
    assert lim.allow("1.2.3.4")


def test_refill_is_capped_at_burst() -> None:
    lim, clock = make()
    drain(lim)
    clock.advance(10_000)
    assert drain(lim) == 20


def test_keys_are_independent() -> None:
    lim, _ = make(burst=2)
    assert lim.allow("a") and lim.allow("a") and not lim.allow("a")
    assert lim.allow("b")
    assert len(lim) == 2


def test_sweep_evicts_only_idle_buckets() -> None:
    lim, clock = make()
    lim.allow("idle")
    clock.advance(60)
    lim.allow("busy")
    clock.advance(60)  # idle: 120 s = burst*interval; busy: 60 s
    assert lim.sweep() == 1
    assert len(lim) == 1
    clock.advance(59.9)
    assert lim.sweep() == 0
    clock.advance(0.1)
    assert lim.sweep() == 1
    assert len(lim) == 0
    assert lim.sweep() == 0


def test_denied_requests_keep_a_bucket_alive() -> None:
    lim, clock = make(burst=2, interval=60)  # idle threshold: 120 s
    assert drain(lim, "x") == 2
    denied = 0
    for _ in range(30):  # 300 s of polling every 10 s, mostly denied
        clock.advance(10)
        denied += not lim.allow("x")
        assert lim.sweep() == 0
    assert denied > 20
    assert len(lim) == 1


def test_burst_zero_disables() -> None:
    lim, _ = make(burst=0, interval=0)
    assert all(lim.allow("a") for _ in range(1000))
    assert len(lim) == 0
    assert lim.sweep() == 0


def test_bad_config() -> None:
    with pytest.raises(ValueError):
        make(burst=-1)
    with pytest.raises(ValueError):
        make(burst=5, interval=0)


def test_exported_buckets_resume_in_another_limiter_with_the_same_tokens_and_phase() -> None:
    lim, clock = make(burst=3, interval=6.0)
    assert drain(lim) == 3
    clock.advance(4.0)  # 2 s short of the next token
    assert not lim.allow("1.2.3.4")
    exported = lim.export()
    assert exported == [("1.2.3.4", 0, 4.0, 0.0)]

    successor, clock2 = make(burst=3, interval=6.0)
    for bucket in exported:
        successor.restore(*bucket)
    assert not successor.allow("1.2.3.4")  # still empty
    clock2.advance(2.0)  # the refill phase carried over: the token is due now
    assert successor.allow("1.2.3.4")
    assert not successor.allow("1.2.3.4")
