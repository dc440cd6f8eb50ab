"""What one relay process's state becomes in a handover, and back.

Owns: choosing the connections a handover carries (every open one still reading its request
head or holding a WebSocket on this instance; not one being closed, nor one whose claim or
admission is still being decided), exporting them with the relay-wide state (the registry's
shape, grace deadlines, rate-limiter buckets, counters, uptime) into a `Blob`, and, in the
successor, rebuilding sessions, registry and connections from it in two steps: `restore`
(nothing touches a socket: the old process may still be serving) and `Restored.start`
(after the old process is gone and every socket is adopted).
Must never: do I/O on a socket itself (Connection does), or carry a connection in part: a
connection is in the blob whole, or not at all.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

from pyrycode_relay.core.handover_state import (
    FORMAT_VERSION,
    Blob,
    BucketState,
    ConnState,
    HandoverError,
)
from pyrycode_relay.core.registry import Claim, Register
from pyrycode_relay.core.stats import RelayStats
from pyrycode_relay.endpoints.client import PhoneSession
from pyrycode_relay.endpoints.relay import Relay
from pyrycode_relay.endpoints.roles import PhoneEndpoint
from pyrycode_relay.endpoints.server import BinarySession
from pyrycode_relay.transport.connection import Connection, ConnSettings, Router

_SCALARS = (
    "frames_phone_to_binary",
    "frames_binary_to_phone",
    "grace_expiries",
    "takeovers",
    "reclaim_evictions",
)
_KEYED = ("register_failures", "heartbeat_closes", "cap_rejections")
_ADOPT_BATCH = 500


def export(
    relay: Relay,
    live: Iterable[Connection],
    kinds: Mapping[int, str],
    listeners: list[str],
    *,
    drain: bool = False,
) -> tuple[list[Connection], Blob]:
    """The connections to hand over and the blob describing them and the relay. `kinds`
    names each carried router by id(); a connection of any other router is not carried.
    Called with the event loop held; raises HandoverError if a connection's state is not
    exactly known (then nothing is handed over)."""
    conns: list[Connection] = []
    states: list[ConnState] = []
    for conn in live:
        kind = kinds.get(id(conn.router))
        if kind is None or not conn.handable:
            continue
        handler = conn.handler
        if conn.ws is None:
            state = ConnState(kind, conn.peer_host, None, head=conn.export_head())
        elif isinstance(handler, BinarySession) and handler.handable:
            state = ConnState(
                kind, conn.peer_host, conn.cap_key, ws=conn.export_ws(), binary=handler.export()
            )
        elif isinstance(handler, PhoneSession) and handler.handable:
            state = ConnState(
                kind, conn.peer_host, conn.cap_key, ws=conn.export_ws(), phone=handler.export()
            )
        else:
            continue
        conns.append(conn)
        states.append(state)
    now = relay.loop.time()
    graces = {
        server_id: max(0.0, end - now)
        for server_id, (_, end) in relay.grace_ends.items()
        if relay.registry.in_grace(server_id) and not drain
    }
    buckets = [BucketState(*bucket) for bucket in relay.limiter.export()]
    blob = Blob(
        format=FORMAT_VERSION,
        exported_at=time.monotonic(),
        listeners=listeners,
        conns=states,
        graces=graces,
        buckets=buckets,
        counters=_counters(relay.stats),
        uptime=time.monotonic() - relay.started,
        drain=drain,
    )
    return conns, blob


def _counters(stats: RelayStats) -> dict[str, int]:
    counters = {name: getattr(stats, name) for name in _SCALARS}
    for name in _KEYED:
        for key, value in getattr(stats, name).items():
            counters[f"{name}/{key}"] = value
    for (endpoint, outcome), value in stats.upgrade_attempts.items():
        counters[f"upgrade_attempts/{endpoint}/{outcome}"] = value
    return counters


def _restore_counters(stats: RelayStats, counters: Mapping[str, int]) -> None:
    for key, value in counters.items():
        name, _, rest = key.partition("/")
        if not rest and name in _SCALARS:
            setattr(stats, name, value)
        elif name in _KEYED and rest in getattr(stats, name):
            getattr(stats, name)[rest] = value
        elif name == "upgrade_attempts":
            endpoint, _, outcome = rest.partition("/")
            if (endpoint, outcome) in stats.upgrade_attempts:
                stats.upgrade_attempts[(endpoint, outcome)] = value


class GoneBinary:
    """The holder of a server-id in grace in the successor: the binary's connection ended
    before the handover, so sends to it fail, as they did to the closed session."""

    __slots__ = ("server_id",)

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id

    @property
    def closing(self) -> bool:
        return True

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def claim_local(self) -> None:
        pass

    def took_over(self) -> None:
        pass

    def conflict(self) -> None:
        pass

    def refuse(self, code: int, reason: str) -> None:
        pass

    def send(self, data: bytes, phone: PhoneEndpoint) -> bool:
        return False

    def notify(self, data: bytes) -> bool:
        return False

    def ping(self, on_pong: Callable[[], None]) -> bool:
        return False

    def close(self, code: int, reason: str = "") -> None:
        pass


@dataclass
class Restored:
    """The successor's rebuilt state, waiting for its sockets."""

    relay: Relay
    blob: Blob
    conns: list[tuple[Connection, socket.socket, ConnState]]
    ghosts: dict[str, GoneBinary]  # the holders of the ids in grace

    async def adopt(self) -> None:
        """Give every connection its socket (reading stays off until `start`), a batch at a
        time: one loop iteration per batch rather than per connection. Binaries first: a
        phone that leaves meanwhile sends its binary a close notice."""
        loop = asyncio.get_running_loop()
        conns = sorted(self.conns, key=lambda entry: entry[2].binary is None)
        for start in range(0, len(conns), _ADOPT_BATCH):
            batch = conns[start : start + _ADOPT_BATCH]
            results = await asyncio.gather(
                *(
                    loop.connect_accepted_socket(partial(_same, conn), sock)
                    for conn, sock, _ in batch
                ),
                return_exceptions=True,
            )
            for (conn, sock, _), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    # This one socket cannot be served: it ends as if its peer had gone;
                    # every other connection goes on.
                    self.relay.log.warn("handover connection not adopted", err=result)
                    sock.close()
                    conn.connection_lost(None)

    def start(self) -> None:
        """Serve: grace windows run on, and each connection sends what its predecessor had
        not, replays what it had read, and reads again."""
        lag = max(0.0, time.monotonic() - self.blob.exported_at)
        relay = self.relay
        for server_id, ghost in self.ghosts.items():
            token = relay.registry.release(server_id, ghost)
            if token is None:
                continue  # reclaimed meanwhile (nothing admits before `start`: not expected)
            relay.arm_grace(server_id, token, max(0.0, self.blob.graces[server_id] - lag))
        for conn, _, state in self.conns:
            if conn.transport is None or conn.closing:
                continue  # its peer left during the handover: already torn down
            if state.ws is None:
                conn.resume_head()
            else:
                conn.resume_ws(state.ws, lag)


def _same(conn: Connection) -> Connection:
    return conn


def restore(
    relay: Relay,
    blob: Blob,
    socks: list[socket.socket],
    *,
    routers: Mapping[str, Router],
    settings: ConnSettings,
    live: set[Connection],
) -> Restored:
    """Rebuild sessions and the registry from `blob` (sockets untouched). Raises
    HandoverError when the blob does not fit this process (then it refuses the handover)."""
    if len(socks) != len(blob.conns):
        raise HandoverError("descriptor count does not match the state")
    registry = relay.registry
    binaries: dict[str, BinarySession] = {}
    phones: dict[str, PhoneSession] = {}
    conns: list[tuple[Connection, socket.socket, ConnState]] = []
    for state, sock in zip(blob.conns, socks, strict=True):
        router = routers.get(state.listener)
        if router is None:
            raise HandoverError(f"no listener of kind {state.listener}")
        conn = Connection(router, settings, live, state.peer_host, handed=True)
        if state.ws is None:
            conn.adopt_head(state.head or b"")
        else:
            if state.binary is not None:
                binary = BinarySession.restored(relay, conn, state.binary)
                if registry.claim(binary.server_id, binary).outcome is not Claim.CLAIMED:
                    raise HandoverError("a server-id is held twice")
                binaries[binary.conn_id] = binary
                conn.adopt_ws(state.ws, binary)
            elif state.phone is not None:
                phone = PhoneSession.restored(relay, conn, state.phone)
                phones[phone.conn_id] = phone
                conn.adopt_ws(state.ws, phone)
            else:
                raise HandoverError("a WebSocket without a session")
            key = state.cap_key
            if key is not None and relay.caps.try_acquire(key) is None:
                conn.on_release = partial(relay.caps.release, key)
                conn.cap_key = key
        conns.append((conn, sock, state))
    # The holders of the ids in grace, in place now so that their phones can register;
    # `start` releases them into grace.
    ghosts: dict[str, GoneBinary] = {}
    for server_id in blob.graces:
        ghost = ghosts[server_id] = GoneBinary(server_id)
        if registry.claim(server_id, ghost).outcome is not Claim.CLAIMED:
            raise HandoverError("a server-id is held twice")
    cap = 1 << 30  # every phone fitted when it was admitted
    for phone in phones.values():
        server_id = phone.server_id
        if registry.register_phone(server_id, phone.conn_id, phone, cap) is not Register.OK:
            raise HandoverError("a phone's server-id is not held")
        phone.registered_as(registry.binary(server_id))
    for binary in binaries.values():
        for conn_id in binary.export().blocked:
            blocked = phones.get(conn_id)
            if blocked is not None:
                binary.block(blocked)
    for bucket in blob.buckets:
        relay.limiter.restore(bucket.key, bucket.tokens, bucket.refill_ago, bucket.seen_ago)
    _restore_counters(relay.stats, blob.counters)
    relay.started = time.monotonic() - blob.uptime
    return Restored(relay, blob, conns, ghosts)
