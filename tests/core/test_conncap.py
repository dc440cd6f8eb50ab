from __future__ import annotations

import pytest

from pyrycode_relay.core.conncap import ConnectionCaps


def test_global_cap() -> None:
    caps = ConnectionCaps(global_max=2, per_ip_max=0)
    assert caps.try_acquire("a") is None
    assert caps.try_acquire("b") is None
    assert caps.try_acquire("c") == "global"
    assert caps.live == 2
    caps.release("a")
    assert caps.try_acquire("c") is None
    assert caps.tracked_ips == 0  # per-IP off: nothing tracked


def test_per_ip_cap() -> None:
    caps = ConnectionCaps(global_max=10, per_ip_max=2)
    assert caps.try_acquire("a") is None
    assert caps.try_acquire("a") is None
    assert caps.try_acquire("a") == "per_ip"
    assert caps.try_acquire("b") is None
    assert caps.live == 3
    caps.release("a")
    assert caps.try_acquire("a") is None


def test_global_is_checked_first() -> None:
    caps = ConnectionCaps(global_max=1, per_ip_max=1)
    assert caps.try_acquire("a") is None
    assert caps.try_acquire("a") == "global"


def test_refusal_takes_nothing() -> None:
    caps = ConnectionCaps(global_max=3, per_ip_max=1)
    assert caps.try_acquire("a") is None
    for _ in range(5):
        assert caps.try_acquire("a") == "per_ip"
    assert caps.live == 1
    assert caps.try_acquire("b") is None
    assert caps.try_acquire("c") is None
    assert caps.try_acquire("d") == "global"
    assert caps.tracked_ips == 3


def test_no_leak_after_release() -> None:
    caps = ConnectionCaps(global_max=1000, per_ip_max=3)
    for i in range(100):
        assert caps.try_acquire(f"10.0.0.{i}") is None
        assert caps.try_acquire(f"10.0.0.{i}") is None
    for i in range(100):
        caps.release(f"10.0.0.{i}")
        caps.release(f"10.0.0.{i}")
    assert caps.live == 0
    assert caps.tracked_ips == 0


def test_unbalanced_release_is_an_error() -> None:
    caps = ConnectionCaps(global_max=5, per_ip_max=1)
    with pytest.raises(RuntimeError):
        caps.release("a")
    assert caps.try_acquire("a") is None
    with pytest.raises(RuntimeError):
        caps.release("b")
    caps.release("a")
    assert caps.live == 0


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="connection cap must be positive"):
        ConnectionCaps(0, 0)
    with pytest.raises(ValueError):
        ConnectionCaps(10, -1)
