"""The servers one bench run measures, and what the run learns about them.

Owns: the command lines of the servers the bench starts alone on a free loopback port (our
relay's flags, the Go stand-in, the same-stack echo server), starting one of them for a run
(through spawn.py, pinned to --relay-cpu, ready once it listens), taking relays someone else
started (--url, --phone-url) and their pids, and `Running`: where the load connects and which
processes to sample. The clusters (and the balancer in front of one) are cluster.py's.
Must never: accept a non-loopback address, or leave a server it started running after the run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pyrycode_relay.tools.bench import load
from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.spawn import Child, listening, relay, relay_env, spawned

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def relay_flags(
    port: int,
    args: argparse.Namespace,
    *,
    metrics_listen: str = "",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """Our relay's flags in a bench: listening on 127.0.0.1:`port`, with no connection cap or
    per-IP rate limit in the way of the load (every connection comes from 127.0.0.1), then
    `extra` and --relay-arg (later flags win)."""
    return [
        "--insecure-listen",
        f"127.0.0.1:{port}",
        "--max-connections",
        "30000",
        "--rate-limit-burst",
        "0",
        "--metrics-listen",
        metrics_listen,
        "--heartbeat-interval",
        str(args.heartbeat_interval),
        *extra,
        *args.relay_arg,
    ]


def server_argv(kind: str, port: int, args: argparse.Namespace) -> list[str]:
    """The command line of the Go stand-in or the echo server on 127.0.0.1:`port`."""
    listen = f"127.0.0.1:{port}"
    if kind == "go":
        if not args.go_relay:
            raise SystemExit("bench: --go-relay PATH is needed for the go relay")
        return [args.go_relay, "--insecure-listen", listen]
    if kind == "echo":
        return [
            sys.executable,
            "-m",
            "pyrycode_relay.tools.bench.echo",
            listen,
            str(args.echo_write_high),
        ]
    raise SystemExit(f"bench: unknown relay {kind!r} (self, go, echo, cluster)")


@dataclass
class Running:
    """What one run measures: where to connect, the server processes to sample
    (name → pid; CPU and RSS are summed over them), a hook that runs once the load has
    drained while every connection is still open, and extra fields for the result, read
    after the load ran and before the processes stop."""

    target: load.Target
    procs: dict[str, int]
    loaded: Callable[[], None] | None = None
    after: Callable[[], dict[str, Any]] = dict


@contextlib.contextmanager
def started(kind: str, args: argparse.Namespace) -> Iterator[Running]:
    """A fresh server of `kind` (self, go, echo) on a free loopback port, pinned to
    --relay-cpu."""
    port = free_port()
    name = f"{kind} relay"
    server: contextlib.AbstractContextManager[Child]
    if kind == "self":
        server = relay(*relay_flags(port, args), port=port, name=name, cpu=args.relay_cpu)
    else:
        server = spawned(
            server_argv(kind, port, args),
            name=name,
            cpu=args.relay_cpu,
            env=relay_env(),
            ready=lambda: listening(port),
            what="listen",
        )
    with server as child:
        time.sleep(0.3)  # let it finish start-up work before we measure its baseline
        yield Running(load.Target("127.0.0.1", port, echo=kind == "echo"), {"relay": child.pid})


def _loopback(url: str, flag: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "ws" or host not in LOOPBACK or parts.port is None:
        raise SystemExit(f"bench: {flag} must be ws://<loopback>:PORT")
    return "::1" if host == "::1" else "127.0.0.1", parts.port


@contextlib.contextmanager
def given(args: argparse.Namespace) -> Iterator[Running]:
    """Relays someone else started: --url (binaries, and phones unless --phone-url), and
    the balancer in front of them (--balancer-pid)."""
    host, port = _loopback(args.url, "--url")
    target = load.Target(host, port)
    procs: dict[str, int] = {}
    if args.phone_url:
        target.phone_host, target.phone_port = _loopback(args.phone_url, "--phone-url")
        if args.phone_pid == args.pid:
            args.phone_pid = None  # one relay behind both URLs: count it once
        if args.pid is not None:
            procs["a"] = args.pid
        if args.phone_pid is not None:
            procs["b"] = args.phone_pid
    elif args.pid is not None:
        procs["relay"] = args.pid
    if args.balancer_pid is not None:
        procs["balancer"] = args.balancer_pid  # a balancer in front of the instances
    yield Running(target, procs)
