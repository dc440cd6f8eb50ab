"""The message bus between relay instances: one Redis pub/sub channel per instance.

Owns: the subscription to our channel (resubscribed with backoff after any Redis failure,
pinged when quiet and given up when it stays silent),
the single publisher task (every message to every peer goes through it, so messages to one
peer leave in the order they were sent — per-phone FIFO rests on this), batching of all
messages queued for one peer in one loop iteration into one PUBLISH, request/reply
matching with timeouts, the up/down state, and the bus counters.
Must never: block the caller of `send` (it only queues), hold more than `queue_limit` bytes
(over it the bus counts as down: cross-instance state is dropped, never silently lost), or
interpret a message other than a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from pyrycode_relay.cluster.codec import (
    CodecError,
    Message,
    Reply,
    carried_bytes,
    channel,
    decode_batch,
    encode_batch,
)

BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 2.0
PUBLISH_BYTES: Final = 512 * 1024  # split a peer's batch into publishes of about this size
MESSAGE_OVERHEAD: Final = 64  # queue accounting per message, besides its frame bytes
FOREIGN_LOG_EVERY: Final = 60.0

FAILURES: Final = (RedisError, OSError, TimeoutError, EOFError)


class BusDown(Exception):
    """The bus is not connected: nothing can cross instances right now."""


SILENT: Final = "subscription silent"  # the `err` logged when keepalive() gives up


class BusStats:
    __slots__ = ("published", "received")

    def __init__(self) -> None:
        self.published = 0
        self.received = 0


class Bus:
    """One instance's end of the cluster bus.

    Concurrency: the loop's thread. `send` only queues (never awaits); the publisher task
    sends rounds, the subscriber task receives and calls `on_message`/`on_peer`
    synchronously, one batch at a time; `request` awaits a reply future. It owns both
    Redis clients it is given and closes them in `close`; `fail` or a Redis error drops
    the subscription and everything queued, so both ends of every cross-instance pair
    forget it together (`on_down`).
    """

    def __init__(
        self,
        subscriber: Redis,
        publisher: Redis,
        instance_id: str,
        incarnation: str,
        *,
        connect_timeout: float,
        queue_limit: int,
        on_peer: Callable[[str, str], None],
        on_message: Callable[[str, Message], None],
        on_foreign: Callable[[str], None],
        on_up: Callable[[], Awaitable[None]],
        on_down: Callable[[str], None],
    ) -> None:
        # Both clients are the bus's own, each on a pool of its own, and close() closes them.
        # The subscriber's connection has no read timeout: it waits for messages as long as
        # peers are quiet, and keepalive() is what notices a deaf one.
        self._subscriber_client = subscriber
        self._publisher_client = publisher
        self.me = instance_id
        self.incarnation = incarnation  # sent with every batch; the placement renews it
        self._channel = channel(instance_id)
        self._connect_timeout = connect_timeout  # bounds a (re)subscription's handshake
        self._queue_limit = queue_limit
        self._on_peer = on_peer
        self._on_message = on_message
        self._on_foreign = on_foreign
        self._foreign_logged = -FOREIGN_LOG_EVERY
        self._on_up = on_up
        self._on_down = on_down
        self.stats = BusStats()
        self.up = False
        self._out: dict[str, list[Message]] = {}
        self._queued = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._req = itertools.count(1)
        self._pending: dict[int, asyncio.Future[str | None]] = {}
        self._settled = asyncio.Event()  # the first connection attempt ended, either way
        self._subscriber: asyncio.Task[None] | None = None
        self._pubsub: PubSub | None = None  # the live subscription, while there is one
        self._heard = False  # anything arrived on it since the last keep-alive tick
        self._pinged = False
        self._pinger: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._closed = False
        self._outages = 0

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect once (bounded by `connect_timeout`); keep retrying in the background if
        that fails. Returns once the first attempt is over."""
        self._publisher = asyncio.create_task(self._publish_loop(), name="cluster-publisher")
        self._subscriber = asyncio.create_task(self._subscribe_loop(0.0), name="cluster-bus")
        await self._settled.wait()

    async def close(self, flush_timeout: float) -> None:
        """Send what is queued (bounded), then stop both tasks."""
        if self.up and (self._out or not self._idle.is_set()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed(), flush_timeout)
        self._closed = True
        for task in (self._subscriber, self._publisher, self._pinger):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_pending()
        for client in (self._subscriber_client, self._publisher_client):
            with contextlib.suppress(*FAILURES):
                await client.aclose()

    async def _flushed(self) -> None:
        while self._out or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    # -- sending --------------------------------------------------------------------

    def send(self, dest: str, message: Message) -> bool:
        """Queue one message for `dest`; False when the bus is down (nothing queued)."""
        if not self.up:
            return False
        self._queued += carried_bytes(message) + MESSAGE_OVERHEAD
        if self._queued > self._queue_limit:
            self.fail("bus queue over its limit")
            return False
        out = self._out.get(dest)
        if out is None:
            self._out[dest] = [message]
            self._wake.set()
        else:
            out.append(message)
        return True

    async def request(self, dest: str, make: Callable[[int], Message], within: float) -> str | None:
        """Send `make(req)` and wait up to `within` seconds for the value of its Reply;
        None on timeout. Raises BusDown if the bus is (or goes) down meanwhile."""
        req = next(self._req)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        try:
            if not self.send(dest, make(req)):
                raise BusDown
            return await asyncio.wait_for(future, within)
        except TimeoutError:
            return None
        finally:
            self._pending.pop(req, None)

    def reply(self, dest: str, req: int, value: str) -> None:
        self.send(dest, Reply(req, value))

    async def _publish_loop(self) -> None:
        # Each round is one PUBLISH (one peer) or one non-transactional pipeline (several),
        # on a pool of one connection of the publisher's own: rounds never queue behind
        # admissions for a pooled connection, and messages to one peer keep their order.
        # redis-py hands out a pooled connection only once it is ready to send, so one that
        # Redis closed while idle (its `timeout`; managed services set one) is replaced
        # there, before anything of ours is written to it: not an outage. After an outage its
        # connection is dropped all the same: it may lead to a server that stayed up but is
        # no longer the one the subscriptions are on (a failover behind a proxy).
        publisher = self._publisher_client
        outages = self._outages
        while True:
            await self._wake.wait()
            self._wake.clear()
            out, self._out = self._out, {}
            self._queued = 0
            if not out or not self.up:
                continue
            self._idle.clear()
            commands: list[tuple[str, bytes]] = []
            count = 0
            for dest, messages in out.items():
                for batch in _batches(messages):
                    commands.append((channel(dest), encode_batch(self.me, self.incarnation, batch)))
                    count += len(batch)
            try:
                if outages != self._outages:
                    outages = self._outages
                    await publisher.connection_pool.disconnect()
                if len(commands) == 1:
                    await publisher.publish(*commands[0])
                else:
                    pipe = publisher.pipeline(transaction=False)
                    for command in commands:
                        pipe.publish(*command)
                    await pipe.execute()
            except FAILURES:
                self.fail("publish failed")
            else:
                self.stats.published += count
            finally:
                self._idle.set()

    # -- receiving ------------------------------------------------------------------

    async def _subscribe_loop(self, delay: float) -> None:
        while not self._closed:
            if delay:
                await asyncio.sleep(delay)
            pubsub = self._subscriber_client.pubsub()
            try:
                # The connection has no read timeout (a subscription waits as long as peers
                # are quiet), so its handshake and the confirmation get one here: a server
                # that accepts and never answers must not hold up start-up or a recovery.
                async with asyncio.timeout(self._connect_timeout):
                    await pubsub.subscribe(self._channel)
                    while True:  # the subscription is live once Redis confirms it
                        msg = await pubsub.get_message(timeout=self._connect_timeout)
                        if msg is None:
                            raise TimeoutError("no subscribe confirmation")
                        if msg["type"] == "subscribe":
                            break
                await self._on_up()
                self.up = True
                self._settled.set()
                delay = 0.0
                self._pubsub = pubsub  # for keepalive()
                self._heard, self._pinged = True, False
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    self._heard = True  # a message or the keep-alive's pong
                    if msg is not None and msg["type"] == "message":
                        self._receive(msg["data"])
            except FAILURES as exc:
                self._down(type(exc).__name__)
            finally:
                self._pubsub = None
                with contextlib.suppress(*FAILURES):
                    await pubsub.aclose()
            self._settled.set()
            delay = min(max(delay * 2, BACKOFF_MIN), BACKOFF_MAX)

    def keepalive(self) -> None:
        """Called every keep-alive period (the placement's lease/3 tick). A NAT or load
        balancer that dropped a quiet flow leaves our subscription open and deaf, and
        nothing else would tell us (our liveness key is renewed on other connections).
        Quiet for a period: PING it (which also keeps such middleboxes from dropping it).
        Still quiet a period later: an outage, since what peers published meanwhile is
        lost. (A timer here rather than a read timeout per message: that cost 3 µs each.)"""
        pubsub = self._pubsub
        if not self.up or pubsub is None:
            return
        if self._heard:
            self._heard = self._pinged = False
        elif self._pinged:
            self.fail(SILENT)
        else:
            self._pinged = True
            if self._pinger is None or self._pinger.done():
                self._pinger = asyncio.create_task(_ping(pubsub), name="cluster-bus-ping")

    def _receive(self, payload: bytes) -> None:
        try:
            sender, incarnation, messages = decode_batch(payload)
        except CodecError as exc:
            # Another version of the relay, or not a relay at all: dropped, said once a minute.
            now = asyncio.get_running_loop().time()
            if now - self._foreign_logged >= FOREIGN_LOG_EVERY:
                self._foreign_logged = now
                self._on_foreign(str(exc))
            return
        self.stats.received += len(messages)
        self._on_peer(sender, incarnation)  # before any of its messages: it may be new
        on_message = self._on_message
        pending = self._pending
        for msg in messages:
            if isinstance(msg, Reply):
                future = pending.get(msg.req)
                if future is not None and not future.done():
                    future.set_result(msg.value)
            else:
                on_message(sender, msg)

    # -- failure --------------------------------------------------------------------

    def fail(self, err: str) -> None:
        """A command on the bus's Redis failed: drop the subscription and start over (with
        backoff), so both sides forget cross-instance state together."""
        if not self.up or self._closed:
            return
        self._down(err)
        if self._subscriber is not None:
            self._subscriber.cancel()
        self._subscriber = asyncio.create_task(
            self._subscribe_loop(BACKOFF_MIN), name="cluster-bus"
        )

    def _down(self, err: str) -> None:
        self._outages += 1
        self._out.clear()
        self._queued = 0
        self._fail_pending()
        if self.up:
            self.up = False
            self._on_down(err)
        elif not self._settled.is_set():
            self._on_down(err)  # the first attempt failed: say so once

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(BusDown())


async def _ping(pubsub: PubSub) -> None:
    # Its PONG reaches the subscriber like a message; a failure here is the subscriber's to see.
    with contextlib.suppress(*FAILURES):
        await pubsub.ping()


def _batches(messages: list[Message]) -> list[list[Message]]:
    """Split one peer's messages into publishes of about PUBLISH_BYTES, in order."""
    batches: list[list[Message]] = []
    current: list[Message] = []
    size = 0
    for msg in messages:
        current.append(msg)
        size += MESSAGE_OVERHEAD + carried_bytes(msg)
        if size >= PUBLISH_BYTES:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches
