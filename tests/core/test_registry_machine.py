"""The registry against a model of plain dicts, driven by hypothesis' state machine.

Every operation the endpoints perform — claim (free / conflict / reclaim), identity-scoped
takeover, release into grace, grace expiry with fresh and stale tokens, phone
registration under a cap, unregistration by the right or the wrong handle — is applied
to both the real `Registry` and a model that states reference §5 directly. After every
step: the results agree, counts match, each server-id has at most one holder and it is
the model's, and every phone is found exactly where the model has it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pyrycode_relay.core.registry import Claim, GraceToken, Register, Registry

SERVER_IDS = ("a", "b", "c")


class H:
    """An opaque handle compared by identity, like the relay's sessions."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


@dataclass
class ModelSlot:
    binary: H
    grace: GraceToken | None = None
    phones: dict[str, H] = field(default_factory=dict)  # insertion order = eviction order


class RegistryMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.real: Registry[H, H] = Registry()
        self.model: dict[str, ModelSlot] = {}
        self.binaries: list[tuple[str, H]] = []  # every binary ever created, with its id
        self.tokens: list[tuple[str, GraceToken]] = []  # every token ever issued
        self.phones: list[tuple[str, str, H]] = []  # every phone ever registered
        self.n = 0

    def _new(self, kind: str) -> H:
        self.n += 1
        return H(f"{kind}{self.n}")

    def _evict_all(self, slot: ModelSlot) -> list[H]:
        evicted = list(slot.phones.values())
        slot.phones.clear()
        return evicted

    # -- binaries -------------------------------------------------------------------

    @rule(sid=st.sampled_from(SERVER_IDS))
    def claim(self, sid: str) -> None:
        b = self._new("b")
        self.binaries.append((sid, b))
        result = self.real.claim(sid, b)
        slot = self.model.get(sid)
        if slot is None:
            self.model[sid] = ModelSlot(b)
            assert result.outcome is Claim.CLAIMED
            assert result.evicted == [] and result.incumbent is None
        elif slot.grace is None:
            assert result.outcome is Claim.CONFLICT
            assert result.incumbent is slot.binary
            assert result.evicted == []
        else:
            assert result.outcome is Claim.RECLAIMED
            assert result.evicted == self._evict_all(slot)
            slot.binary, slot.grace = b, None

    @rule(data=st.data())
    def take_over(self, data: st.DataObject) -> None:
        """A claimant whose probe of `incumbent` went unanswered."""
        if not self.binaries:
            return
        sid, incumbent = data.draw(st.sampled_from(self.binaries))
        b = self._new("t")
        self.binaries.append((sid, b))
        evicted = self.real.take_over(sid, b, incumbent)
        slot = self.model.get(sid)
        if slot is None:
            self.model[sid] = ModelSlot(b)
            assert evicted == []
        elif slot.binary is not incumbent:
            assert evicted is None  # another claimant won: the caller sends 4409
        else:
            assert evicted == self._evict_all(slot)
            slot.binary, slot.grace = b, None

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.binaries:
            return
        sid, b = data.draw(st.sampled_from(self.binaries))
        token = self.real.release(sid, b)
        slot = self.model.get(sid)
        if slot is None or slot.binary is not b:
            assert token is None  # a displaced or never-holding binary arms nothing
            return
        assert token is not None and token is not slot.grace
        slot.grace = token
        self.tokens.append((sid, token))

    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        """A grace timer fires, carrying the token it was armed with (fresh or stale)."""
        if not self.tokens:
            return
        sid, token = data.draw(st.sampled_from(self.tokens))
        phones = self.real.expire(sid, token)
        slot = self.model.get(sid)
        if slot is None or slot.grace is not token:
            assert phones is None
            return
        assert phones == list(slot.phones.values())
        del self.model[sid]

    @rule(data=st.data(), anyone=st.booleans())
    def surrender(self, data: st.DataObject, anyone: bool) -> None:
        """Cluster mode hands the id to another instance (a remote probe found the holder
        dead or in grace, or a lease renewal found the id owned elsewhere)."""
        if not self.binaries:
            return
        sid, b = data.draw(st.sampled_from(self.binaries))
        phones = self.real.surrender(sid, None if anyone else b)
        slot = self.model.get(sid)
        if slot is None or (not anyone and slot.binary is not b):
            assert phones is None
            return
        assert phones == list(slot.phones.values())
        del self.model[sid]

    # -- phones ---------------------------------------------------------------------

    @rule(sid=st.sampled_from(SERVER_IDS), cap=st.integers(min_value=0, max_value=3))
    def register_phone(self, sid: str, cap: int) -> None:
        p = self._new("p")
        conn_id = f"client-{sid}-{p.name}"
        outcome = self.real.register_phone(sid, conn_id, p, cap)
        slot = self.model.get(sid)
        if slot is None:
            assert outcome is Register.NO_SERVER  # checked before the cap
        elif len(slot.phones) >= cap:
            assert outcome is Register.AT_CAP
        else:
            assert outcome is Register.OK
            slot.phones[conn_id] = p
            self.phones.append((sid, conn_id, p))

    @rule(data=st.data(), impostor=st.booleans())
    def unregister_phone(self, data: st.DataObject, impostor: bool) -> None:
        if not self.phones:
            return
        sid, conn_id, p = data.draw(st.sampled_from(self.phones))
        handle = H("impostor") if impostor else p
        removed = self.real.unregister_phone(sid, conn_id, handle)
        slot = self.model.get(sid)
        expected = slot is not None and slot.phones.get(conn_id) is handle
        assert removed is expected
        if expected:
            assert slot is not None
            del slot.phones[conn_id]

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def grace_and_ids_match(self) -> None:
        assert sorted(self.real.server_ids()) == sorted(self.model)
        for sid in SERVER_IDS:
            slot = self.model.get(sid)
            assert self.real.in_grace(sid) == (slot is not None and slot.grace is not None)

    @invariant()
    def counts_match(self) -> None:
        gracing = sum(s.grace is not None for s in self.model.values())
        phones = sum(len(s.phones) for s in self.model.values())
        assert self.real.counts() == (len(self.model) - gracing, phones)

    @invariant()
    def one_holder_per_server_id(self) -> None:
        for sid in SERVER_IDS:
            holders = [b for s, b in self.binaries if s == sid and self.real.holds(sid, b)]
            slot = self.model.get(sid)
            assert holders == ([] if slot is None else [slot.binary])
            assert self.real.binary(sid) is (None if slot is None else slot.binary)

    @invariant()
    def phones_where_the_model_has_them(self) -> None:
        for sid, conn_id, _p in self.phones:
            slot = self.model.get(sid)
            expected = None if slot is None else slot.phones.get(conn_id)
            assert self.real.phone(sid, conn_id) is expected
            for other in SERVER_IDS:  # cross-server isolation (§5.6)
                if other != sid:
                    assert self.real.phone(other, conn_id) is None


RegistryMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_registry_state_machine = RegistryMachine.TestCase
