"""`/v1/client`: one phone's session, from registration to close notice.

Owns: phone registration (4404 / 4429, reference §5.4), the phone forwarder (JSON check,
wrap, send to whichever binary holds the slot now; a bad frame ends only this phone,
§7.7), the phone's outbox writer (§7.6: FIFO, byte budget, close directives after the
frames before them), and the close notice to the binary (§6.3 + README §3 decision 1).
Must never: block the binary. Delivery only enqueues; writing happens when this
phone's socket can take it, bounded by --write-timeout.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from pyrycode_relay.core.envelope import (
    ERR_NOT_JSON,
    frame_prefix,
    is_json,
    is_legal_close_code,
    wrap,
)
from pyrycode_relay.core.handover_state import PhoneState
from pyrycode_relay.core.outbox import Item, Outbox
from pyrycode_relay.core.registry import Register
from pyrycode_relay.endpoints.roles import ERR_BINARY_GONE, HeldByConnection
from pyrycode_relay.transport.connection import Connection

if TYPE_CHECKING:
    from pyrycode_relay.endpoints.relay import Relay
    from pyrycode_relay.endpoints.roles import Binary, RemoteRoute

ERR_BACKLOG_FULL = "relay: phone delivery backlog full"
ERR_OUTBOX_CLOSED = "relay: phone outbox closed"
ERR_WRITE_TIMEOUT = "relay: phone write timed out"
GOING_AWAY = 1001


class PhoneSession(HeldByConnection):
    """One phone's WebSocket on `/v1/client`: admission, its outbox, its teardown.

    Concurrency: the loop's thread only: its connection's callbacks (messages, writability,
    timeouts, close), its binary's session (delivery, directives, pause/resume) and, in
    cluster mode, the placement's tasks (the admission's answer) and the bus's subscriber
    (what its binary on another instance does to it). Nothing here awaits. It never closes
    its binary; it closes only its own connection, and its `on_closed` unregisters it and
    sends the close notice exactly once.
    """

    __slots__ = (
        "_binary",
        "_directed",
        "_notice_code",
        "_prefix",
        "_registered",
        "_route",
        "conn",
        "conn_id",
        "device_name",
        "outbox",
        "relay",
        "remote",
        "server_id",
    )

    def __init__(
        self,
        relay: Relay,
        conn: Connection,
        server_id: str,
        device_name: str,
        remote: str,
        *,
        conn_id: str = "",
    ) -> None:
        self.relay = relay
        self.conn = conn
        self.server_id = server_id
        self.device_name = device_name
        self.remote = remote
        self.conn_id = conn_id or f"client-{server_id}-{secrets.token_hex(4)}"
        self._prefix = frame_prefix(self.conn_id)
        self.outbox = Outbox(relay.config.phone_outbox_bytes, relay.budget)
        self._registered = False
        self._binary: Binary | None = None  # the binary at registration time
        self._route: RemoteRoute | None = None  # cluster mode: the owner instance's bus
        self._directed = False  # the binary queued a close directive for us
        self._notice_code: int | None = None  # set when our own teardown implies 1001

    def start(self) -> None:
        self.relay.ws_opened("client", self.conn)
        self.relay.placement.admit(self)

    # -- live handover --------------------------------------------------------------

    @property
    def handable(self) -> bool:
        """Registered here (an admission still in flight or a phone whose binary is on
        another instance is not carried)."""
        return self._registered and self._route is None and not self.outbox.closed

    def export(self) -> PhoneState:
        outbox = self.outbox
        return PhoneState(
            conn_id=self.conn_id,
            server_id=self.server_id,
            device_name=self.device_name,
            remote=self.remote,
            directed=self._directed,
            notice_code=self._notice_code,
            outbox=[(item.frame, item.close_code) for item in outbox.items()],
            inflight=outbox.inflight,
        )

    @classmethod
    def restored(cls, relay: Relay, conn: Connection, state: PhoneState) -> PhoneSession:
        """The session a predecessor exported, with its outbox; `registered_as` follows
        once the registry holds it."""
        session = cls(
            relay, conn, state.server_id, state.device_name, state.remote, conn_id=state.conn_id
        )
        session._directed = state.directed
        session._notice_code = state.notice_code
        if state.outbox or state.inflight:
            session.outbox.restore([Item(f, c) for f, c in state.outbox], state.inflight)
        return session

    def registered_as(self, binary: Binary | None) -> None:
        """The registry holds this phone (restored) for `binary`."""
        self._registered = True
        self._binary = binary

    def register_local(self) -> None:
        """Registration with the binary on this instance (4404 when there is none)."""
        relay = self.relay
        outcome = relay.registry.register_phone(
            self.server_id, self.conn_id, self, relay.config.max_phones_per_server
        )
        if outcome is not Register.OK:
            self.refuse(outcome)
            return
        self._binary = relay.registry.binary(self.server_id)
        self._registered_ok()

    def register_remote(self, route: RemoteRoute) -> None:
        """The owner instance admitted us: frames and our close travel over `route`."""
        self._route = route
        self._registered_ok()

    def refuse(self, outcome: Register) -> None:
        relay = self.relay
        if outcome is Register.NO_SERVER:
            relay.stats.upgrade("client", "reject_404")
            relay.stats.register_failures["no_server"] += 1
            relay.log.info("phone_register_no_server", server_id=self.server_id, remote=self.remote)
            self._refused_debug("no_server", 4404)
            self.conn.close(4404, "no server with that id")
            return
        if outcome is Register.AT_CAP:
            relay.stats.upgrade("client", "reject_429")
            relay.stats.register_failures["phones_at_cap"] += 1
            relay.log.warn("phone_register_at_cap", server_id=self.server_id, remote=self.remote)
            self._refused_debug("phones_at_cap", 4429)
            self.conn.close(4429, "too many phones for server-id")

    def unavailable(self, code: int, reason: str) -> None:
        """Admission the cluster cannot decide now: close `code` (1013), try again."""
        self.relay.log.warn("phone_register_unavailable", server_id=self.server_id, close_code=code)
        self._refused_debug("cluster_unavailable", code)
        self.conn.close(code, reason)

    def _refused_debug(self, reason: str, code: int) -> None:
        self.relay.refused_after_upgrade("/v1/client", reason, self.server_id, code, self.remote)

    def _registered_ok(self) -> None:
        relay = self.relay
        self._registered = True
        relay.stats.upgrade("client", "accept")
        relay.log.info(
            "phone_registered",
            server_id=self.server_id,
            conn_id=self.conn_id,
            device_name=self.device_name,
            remote=self.remote,
        )
        self.conn.start_heartbeat()

    # -- forwarding: phone → binary -----------------------------------------------

    def on_message(self, data: bytes) -> None:
        if not self._registered:
            return
        relay = self.relay
        if not is_json(data):
            relay.log.warn(
                "phone_forwarder_marshal_err",
                server_id=self.server_id,
                conn_id=self.conn_id,
                err=ERR_NOT_JSON,
            )
            self.end(1000)
            return
        route = self._route
        if route is not None:  # our binary is on another instance
            if not route.forward(self, wrap(self._prefix, data)):
                self.evict(1013, "cluster unavailable")
            return
        sent = relay.to_binary(self.server_id, wrap(self._prefix, data), self)
        if sent is None:
            relay.log.info(
                "phone_forwarder_no_binary", server_id=self.server_id, conn_id=self.conn_id
            )
            self.end(1000)
        elif not sent:
            relay.log.info(
                "phone_forwarder_send_failed",
                server_id=self.server_id,
                conn_id=self.conn_id,
                err=ERR_BINARY_GONE,
            )
            self.end(1000)

    def end(self, code: int) -> None:
        """The relay ends this phone's read loop for a reason of the phone's own side;
        the binary hears 1001 (reference §6.3)."""
        self._notice_code = GOING_AWAY
        self.conn.close(code)

    # -- delivery: binary → phone (the outbox writer) -----------------------------

    def deliver(self, frame: bytes) -> None:
        self._enqueue(Item(frame, 0))

    def close_directive(self, frame: bytes | None, close_code: int) -> None:
        self._directed = True  # from now on, no close notice for this phone
        log = self.relay.log
        log.info(
            "binary_forwarder_phone_closed",
            server_id=self.server_id,
            conn_id=self.conn_id,
            close_code=close_code,
        )
        if not is_legal_close_code(close_code):
            log.warn(
                "binary_forwarder_bad_close_code",
                server_id=self.server_id,
                conn_id=self.conn_id,
                close_code=close_code,
            )
            close_code = 1011
        self._enqueue(Item(frame, close_code))

    def _enqueue(self, item: Item) -> None:
        outbox = self.outbox
        if outbox.closed or self.conn.closing:
            self._enqueue_failed(ERR_OUTBOX_CLOSED)
            return
        if not outbox.push(item):
            self._enqueue_failed(ERR_BACKLOG_FULL)
            outbox.clear()
            self.conn.close(item.close_code or 1011, "phone backlog full")
            return
        if not self.conn.write_paused:
            self._pump()

    def _enqueue_failed(self, err: str) -> None:
        self.relay.log.info(
            "binary_forwarder_phone_enqueue_failed",
            server_id=self.server_id,
            conn_id=self.conn_id,
            err=err,
        )

    def _pump(self) -> None:
        # Hands queued items to the connection until its batch for this loop iteration
        # is full or its socket is blocked. Popped items stay counted in the outbox until
        # `on_writable` reports the batch written, so batching never loosens the budget.
        outbox = self.outbox
        conn = self.conn
        stats = self.relay.stats
        while len(outbox) and not conn.write_paused and not conn.batch_full:
            item = outbox.pop()
            if item.frame is not None:
                if not conn.send_text(item.frame):
                    outbox.clear()
                    return
                stats.frames_binary_to_phone += 1
            if item.close_code:
                outbox.clear()  # frames queued after a directive are dropped
                conn.close(item.close_code)
                return

    def on_writable(self) -> None:
        self.outbox.written()
        self._pump()

    def on_write_timeout(self) -> None:
        self.relay.log.info(
            "binary_forwarder_phone_send_failed",
            server_id=self.server_id,
            conn_id=self.conn_id,
            err=ERR_WRITE_TIMEOUT,
        )
        self.outbox.clear()
        self.conn.close(1011, "phone write failed")

    def on_heartbeat_timeout(self) -> None:
        self.relay.stats.heartbeat_closes["client"] += 1
        self.outbox.clear()
        self.conn.close(1011, "heartbeat timeout")

    def pause(self) -> bool:
        self.conn.pause_reading()
        return True

    def resume(self) -> None:
        self.conn.resume_reading()

    def evict(self, code: int, reason: str) -> None:
        """Eviction, grace expiry, shutdown: bypass the queue and close now."""
        self.outbox.clear()
        self.conn.close(code, reason)

    def shutdown(self) -> None:
        self.evict(1001, "shutting down")

    # -- teardown -------------------------------------------------------------------

    def on_closed(self) -> None:
        self.relay.ws_ended("client", self.conn, self.server_id, self.conn_id)
        self.outbox.clear()
        if not self._registered:
            return
        notice_code = 0 if self._directed else self._notice_close_code()
        route = self._route
        if route is not None:
            route.closed(self, notice_code)
            return
        self.relay.phone_gone(self.server_id, self, self._binary, notice_code)

    def _notice_close_code(self) -> int:
        code = self._notice_code
        if code is not None:
            return code
        conn = self.conn
        if conn.timed_out_reading:
            return GOING_AWAY
        return conn.peer_close_code or conn.relay_close_code or GOING_AWAY
