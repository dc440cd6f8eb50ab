"""The e2e harness itself: ports it hands out stay free, and a relay that cannot start
fails its test at once with the relay's own log (not a bare timeout ten seconds later)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pyrycode_relay.tools.bench.ports import free_port
from tests.e2e.harness import start_relay


def test_free_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    # an outgoing connection's source port can never take one of them
    assert all(p < ephemeral_low for p in ports)


async def test_a_relay_that_exits_before_starting_fails_fast_with_its_log() -> None:
    with socket.socket() as holder:
        port = free_port()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(AssertionError) as failure:
            async with start_relay(f"--insecure-listen=127.0.0.1:{port}"):
                pass
        assert loop.time() - t0 < 5  # the harness's start timeout is 10 s
    assert "listener failed" in str(failure.value)
    assert "exited 1" in str(failure.value)
