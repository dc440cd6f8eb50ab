"""Same-stack echo server: the relay's own transport with an echo handler instead of the
relay endpoints, so relay ÷ echo says how much the relay adds on top of its transport.

Owns: a router that upgrades `/echo` and echoes every message back as a text frame.
Must never: listen on anything but loopback, or be used outside the bench.

    python -m pyrycode_relay.tools.bench.echo 127.0.0.1:PORT [WRITE_HIGH]

WRITE_HIGH is the send-buffer allowance per connection: 1 MiB by default, like nothing
in particular (writes are batched per loop iteration, ADR 0010); 0 gives the phones'
setting (one write per frame), for a ceiling with the relay's phone-side write pattern.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from pyrycode_relay.core.config import parse_args
from pyrycode_relay.transport.connection import Connection, ConnSettings
from pyrycode_relay.transport.http import (
    RequestHead,
    error_response,
    handshake_error,
    websocket_handshake,
)

# The relay's own defaults: the echo must run the same stack with the same limits.
SETTINGS = ConnSettings.from_config(parse_args([], {}))


class _Echo:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def on_message(self, data: bytes) -> None:
        self.conn.send_text(data)

    def on_writable(self) -> None:
        pass

    def on_write_timeout(self) -> None:
        self.conn.abort()

    def on_heartbeat_timeout(self) -> None:
        self.conn.close(1011, "heartbeat timeout")

    def on_closed(self) -> None:
        pass

    def shutdown(self) -> None:
        self.conn.close(1001)


class EchoRouter:
    def __init__(self, write_high: int) -> None:
        self.write_high = write_high

    def route(self, conn: Connection, head: RequestHead) -> None:
        if head.path != "/echo":
            conn.respond(error_response(404))
            return
        handshake = websocket_handshake(head)
        if handshake is None:
            conn.respond(handshake_error(head))
            return
        conn.accept_websocket(handshake, _Echo(conn), self.write_high, conn.start_heartbeat)


async def serve(host: str, port: int, write_high: int) -> None:
    loop = asyncio.get_running_loop()
    live: set[Connection] = set()
    router = EchoRouter(write_high)
    server = await loop.create_server(lambda: Connection(router, SETTINGS, live), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str]) -> int:
    host, _, port = argv[0].rpartition(":")
    write_high = int(argv[1]) if len(argv) > 1 else 1 << 20
    if host not in ("127.0.0.1", "::1", "[::1]"):
        print("echo: loopback only", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host.strip("[]"), int(port), write_high))
    else:
        uvloop.run(serve(host.strip("[]"), int(port), write_high))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
