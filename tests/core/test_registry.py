"""Registry state machine: claims, grace tokens, identity-scoped takeover, caps, counts."""

from __future__ import annotations

from pyrycode_relay.core.registry import Claim, Register, Registry


class H:
    """An opaque handle; compared by identity like the relay's sessions."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_first_claim_wins_then_conflict() -> None:
    r: Registry[H, H] = Registry()
    b1, b2 = H("b1"), H("b2")
    assert r.claim("s", b1).outcome is Claim.CLAIMED
    result = r.claim("s", b2)
    assert result.outcome is Claim.CONFLICT and result.incumbent is b1
    assert r.binary("s") is b1
    assert r.counts() == (1, 0)


def test_release_grace_reclaim_evicts_phones() -> None:
    r: Registry[H, H] = Registry()
    b1, b2, p1, p2 = H("b1"), H("b2"), H("p1"), H("p2")
    r.claim("s", b1)
    assert r.register_phone("s", "c1", p1, cap=16) is Register.OK
    token = r.release("s", b1)
    assert token is not None
    assert r.counts() == (0, 1)  # a binary in grace is not counted; its phones are
    assert r.register_phone("s", "c2", p2, cap=16) is Register.OK  # allowed during grace
    result = r.claim("s", b2)
    assert result.outcome is Claim.RECLAIMED and result.evicted == [p1, p2]
    assert r.counts() == (1, 0)
    assert r.expire("s", token) is None  # the old timer is stale now
    assert r.binary("s") is b2


def test_grace_expiry_frees_slot_and_returns_phones() -> None:
    r: Registry[H, H] = Registry()
    b, p = H("b"), H("p")
    r.claim("s", b)
    r.register_phone("s", "c", p, cap=16)
    token = r.release("s", b)
    assert token is not None
    assert r.expire("s", token) == [p]
    assert r.counts() == (0, 0)
    assert r.register_phone("s", "c", H("p2"), cap=16) is Register.NO_SERVER
    assert r.claim("s", H("b2")).outcome is Claim.CLAIMED


def test_second_release_replaces_token() -> None:
    r: Registry[H, H] = Registry()
    b = H("b")
    r.claim("s", b)
    t1 = r.release("s", b)
    t2 = r.release("s", b)
    assert t1 is not None and t2 is not None and t1 is not t2
    assert r.expire("s", t1) is None
    assert r.counts() == (0, 0)
    assert r.expire("s", t2) == []


def test_release_by_non_holder_is_ignored() -> None:
    r: Registry[H, H] = Registry()
    b1, b2 = H("b1"), H("b2")
    r.claim("s", b1)
    assert r.release("s", b2) is None
    assert r.release("other", b1) is None
    assert r.counts() == (1, 0)


def test_takeover_is_identity_scoped() -> None:
    r: Registry[H, H] = Registry()
    inc, c1, c2, p = H("inc"), H("c1"), H("c2"), H("p")
    r.claim("s", inc)
    r.register_phone("s", "c", p, cap=16)
    assert r.take_over("s", c1, inc) == [p]
    assert r.binary("s") is c1
    assert r.take_over("s", c2, inc) is None  # c1 won the race
    assert r.release("s", inc) is None  # the displaced incumbent cannot arm grace
    assert r.counts() == (1, 0)


def test_takeover_of_incumbent_in_grace_cancels_grace() -> None:
    r: Registry[H, H] = Registry()
    inc, new = H("inc"), H("new")
    r.claim("s", inc)
    token = r.release("s", inc)
    assert token is not None
    assert r.take_over("s", new, inc) == []
    assert r.counts() == (1, 0)
    assert r.expire("s", token) is None


def test_takeover_of_vanished_slot_claims_it() -> None:
    r: Registry[H, H] = Registry()
    inc, new = H("inc"), H("new")
    r.claim("s", inc)
    token = r.release("s", inc)
    assert token is not None
    r.expire("s", token)
    assert r.take_over("s", new, inc) == []
    assert r.binary("s") is new


def test_phone_cap_no_server_first_and_recovery() -> None:
    r: Registry[H, H] = Registry()
    assert r.register_phone("s", "c0", H("p"), cap=0) is Register.NO_SERVER
    r.claim("s", H("b"))
    phones = [H(f"p{i}") for i in range(3)]
    assert r.register_phone("s", "c0", phones[0], cap=2) is Register.OK
    assert r.register_phone("s", "c1", phones[1], cap=2) is Register.OK
    assert r.register_phone("s", "c2", phones[2], cap=2) is Register.AT_CAP
    assert r.unregister_phone("s", "c0", phones[0])
    assert not r.unregister_phone("s", "c0", phones[0])  # idempotent
    assert r.register_phone("s", "c2", phones[2], cap=2) is Register.OK
    assert r.counts() == (1, 2)


def test_unregister_checks_identity_and_cross_server_isolation() -> None:
    r: Registry[H, H] = Registry()
    r.claim("s1", H("b1"))
    r.claim("s2", H("b2"))
    p = H("p")
    r.register_phone("s1", "c", p, cap=16)
    assert r.phone("s2", "c") is None  # another server-id's phone is unknown
    assert r.phone("s1", "c") is p
    assert not r.unregister_phone("s1", "c", H("impostor"))
    assert r.phone("s1", "c") is p
