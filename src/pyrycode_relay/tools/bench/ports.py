"""Loopback ports for the relays, echo servers and redis-servers that a bench, a soak or a
test starts as child processes.

Owns: handing out a port that stays free until the child binds it, and never the same one
twice in a process. Must never: hand out a port in the kernel's ephemeral range. Such a
port, closed again before the child starts, can be taken meanwhile as some connection's
source port, and the child then fails to bind (a flaky run).
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path


def _unassigned_ports() -> range:
    """Ports below the kernel's ephemeral range: neither bind(0) nor an outgoing connect()
    ever picks one."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, max(low, 20000))


_PORTS = _unassigned_ports()
# A start of its own per process, then never the same port twice in one run.
_next_port = itertools.count(os.getpid() * 7919 % len(_PORTS))


def free_port() -> int:
    """A loopback port nobody holds, never handed out before by this process."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_next_port) % len(_PORTS)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # some other service's port
        return port
    raise RuntimeError(f"no free loopback port in {_PORTS}")


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports."""
    return [free_port() for _ in range(n)]
