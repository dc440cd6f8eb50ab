"""`/v1/server`: one binary's session, from claim to grace release.

Owns: the claim (free / reclaim / conflict probe / takeover, reference §5.1-§5.2), the
binary forwarder (envelopes → phone outboxes, §3.5 and §7.7: a bad envelope is dropped
and the binary stays up), back-pressure toward phones while the binary's socket is
congested, and the release into grace when the connection ends.
Must never: wait on a phone's socket or on a push send. Phone delivery only enqueues
(endpoints.client); a push wake only schedules its send (ops.push).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyrycode_relay.core.envelope import EnvelopeError, decode_binary_envelope
from pyrycode_relay.core.handover_state import BinaryState
from pyrycode_relay.core.registry import Claim
from pyrycode_relay.endpoints.roles import HeldByConnection
from pyrycode_relay.transport.connection import Connection
from pyrycode_relay.transport.timers import probe

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.relay import Relay
    from pyrycode_relay.endpoints.roles import Binary, PhoneEndpoint


class BinarySession(HeldByConnection):
    """One binary's WebSocket on `/v1/server`: the claim, forwarding, back-pressure, grace.

    Concurrency: runs on the loop's thread from its connection's callbacks and from its
    phones' sessions (`send`, `notify`), and from the placement's decision (which may come
    later, from a task, in cluster mode). It closes its own connection and, on a takeover,
    the incumbent's; phones it only addresses (deliver, directive, evict), never closes
    directly.
    """

    __slots__ = (
        "_blocked",
        "_pending",
        "binary_version",
        "conn",
        "conn_id",
        "relay",
        "remote",
        "server_id",
    )

    def __init__(
        self,
        relay: Relay,
        conn: Connection,
        server_id: str,
        binary_version: str,
        remote: str,
        *,
        conn_id: str = "",
    ) -> None:
        self.relay = relay
        self.conn = conn
        self.server_id = server_id
        self.binary_version = binary_version
        self.remote = remote
        self.conn_id = conn_id or f"server-{server_id}-{secrets.token_hex(4)}"
        self._pending = True  # until the claim is decided
        self._blocked: list[PhoneEndpoint] = []  # phones paused until our socket drains

    # -- live handover --------------------------------------------------------------

    @property
    def handable(self) -> bool:
        """Holding its id (a claim still being decided is not carried)."""
        return not self._pending and self.relay.registry.holds(self.server_id, self)

    def export(self) -> BinaryState:
        return BinaryState(
            conn_id=self.conn_id,
            server_id=self.server_id,
            binary_version=self.binary_version,
            remote=self.remote,
            blocked=[phone.conn_id for phone in self._blocked],
        )

    @classmethod
    def restored(cls, relay: Relay, conn: Connection, state: BinaryState) -> BinarySession:
        """The session a predecessor exported, holding its id (the caller claims it) and
        with its blocked phones still to be added (`block`)."""
        session = cls(
            relay, conn, state.server_id, state.binary_version, state.remote, conn_id=state.conn_id
        )
        session._pending = False
        return session

    def block(self, phone: PhoneEndpoint) -> None:
        """`phone` waits (paused) for this binary's socket to drain."""
        self._blocked.append(phone)

    # -- what a claimant elsewhere sees (roles.Binary; held and released: HeldByConnection)

    def ping(self, on_pong: Callable[[], None]) -> bool:
        return self.conn.ping(on_pong)

    def close(self, code: int, reason: str = "") -> None:
        self.conn.close(code, reason)

    # -- claim ----------------------------------------------------------------------

    def start(self) -> None:
        self.relay.ws_opened("server", self.conn)
        self.relay.placement.claim(self)

    def claim_local(self) -> None:
        """The claim on this instance's registry (in cluster mode: once this instance owns
        the id, or already held it)."""
        if self.conn.closing:
            return  # the claimant left while a cluster claim was in flight
        result = self.relay.registry.claim(self.server_id, self)
        if result.outcome is Claim.CONFLICT:
            assert result.incumbent is not None
            self._probe(result.incumbent)
            return
        if result.outcome is Claim.RECLAIMED:
            self.relay.evict_reclaimed(result.evicted)
        self._claimed()

    def _claimed(self) -> None:
        self._pending = False
        relay = self.relay
        relay.stats.upgrade("server", "accept")
        relay.log.info(
            "server_claimed",
            server_id=self.server_id,
            binary_version=self.binary_version,
            remote=self.remote,
        )
        self.conn.start_heartbeat()

    def _probe(self, incumbent: Binary) -> None:
        """Ping the incumbent (§5.2): a pong means it is alive (→ 4409); silence within
        --conflict-probe-timeout means it is dead (→ takeover)."""
        relay = self.relay
        probe(
            incumbent,
            relay.loop,
            relay.config.conflict_probe_timeout,
            alive=self.conflict,
            silent=lambda: self._take_over(incumbent),
        )

    def conflict(self) -> None:
        if self.conn.closing:
            return
        relay = self.relay
        relay.stats.upgrade("server", "reject_409")
        relay.stats.register_failures["server_in_use"] += 1
        relay.log.info("server_id_conflict", server_id=self.server_id, remote=self.remote)
        self._refused_debug("server_in_use", 4409)
        self.conn.close(4409, "server-id already claimed")

    def _take_over(self, incumbent: Binary) -> None:
        if self.conn.closing:
            return  # the claimant left during the probe
        relay = self.relay
        if relay.shutting_down:
            self.conn.close(1000)
            return
        evicted = relay.registry.take_over(self.server_id, self, incumbent)
        if evicted is None:
            self.conflict()  # another claimant won the race
            return
        self.took_over()
        relay.evict_reclaimed(evicted)
        incumbent.close(1011, "heartbeat timeout")
        self._claimed()

    def took_over(self) -> None:
        self.relay.stats.takeovers += 1
        self.relay.log.info("server_id_takeover", server_id=self.server_id, remote=self.remote)

    def refuse(self, code: int, reason: str) -> None:
        """A claim the cluster cannot decide now (Redis unreachable): 1013, try again."""
        self.relay.log.warn("server_claim_unavailable", server_id=self.server_id, close_code=code)
        self._refused_debug("cluster_unavailable", code)
        self.conn.close(code, reason)

    def _refused_debug(self, reason: str, code: int) -> None:
        self.relay.refused_after_upgrade("/v1/server", reason, self.server_id, code, self.remote)

    # -- forwarding: binary → phones ----------------------------------------------

    def on_message(self, data: bytes) -> None:
        relay = self.relay
        registry = relay.registry
        server_id = self.server_id
        if self._pending or registry.binary(server_id) is not self:
            return  # not (or no longer) the holder: nothing to address
        try:
            env = decode_binary_envelope(data)
        except EnvelopeError as exc:
            relay.log.warn(
                "binary_forwarder_unmarshal_err",
                server_id=server_id,
                binary_conn_id=self.conn_id,
                err=str(exc),
            )
            return
        conn_id = env.conn_id
        if not conn_id:  # a push-wake request: decided now, sent in the background
            relay.push.wake(server_id, self.conn_id, bytes(env.push_wake))
            return
        phone = registry.phone(server_id, conn_id)
        if phone is None:
            relay.log.warn("binary_forwarder_unknown_conn_id", server_id=server_id, conn_id=conn_id)
            return
        frame = bytes(env.frame) if env.has_frame else None
        if env.close_code:
            phone.close_directive(frame, env.close_code)
        else:
            assert frame is not None
            phone.deliver(frame)

    # -- forwarding: phones → binary ----------------------------------------------

    def send(self, data: bytes, phone: PhoneEndpoint) -> bool:
        """Write one envelope to the binary. If its socket is congested, `phone` stops
        being read until the binary drains (the bounded equivalent of the reference's
        synchronous, write-timeout-bounded send)."""
        conn = self.conn
        if not conn.send_text(data):
            return False
        if conn.write_paused and phone.pause():
            self._blocked.append(phone)
        return True

    def notify(self, data: bytes) -> bool:
        """A close notice: written like a frame, never blocks anyone."""
        return self.conn.send_text(data)

    def on_writable(self) -> None:
        self._release_blocked()

    def _release_blocked(self) -> None:
        blocked, self._blocked = self._blocked, []
        for phone in blocked:
            phone.resume()

    def on_write_timeout(self) -> None:
        # The binary stopped reading for --write-timeout: drop it (its phones notice on
        # their next frame), exactly as a failed write tears down the reference's conn.
        self.conn.abort()

    def on_heartbeat_timeout(self) -> None:
        self.relay.stats.heartbeat_closes["server"] += 1
        self.conn.close(1011, "heartbeat timeout")

    def shutdown(self) -> None:
        if self._pending:
            self.conn.close(1000)  # shutdown during the conflict probe: a plain close
        else:
            self.conn.close(1001, "shutting down")

    def on_closed(self) -> None:
        relay = self.relay
        relay.ws_ended("server", self.conn, self.server_id, self.conn_id)
        self._release_blocked()
        token = relay.registry.release(self.server_id, self)
        if token is None:
            return  # never held the slot, or was taken over
        relay.arm_grace(self.server_id, token)
        relay.log.info("server_released", server_id=self.server_id)
