"""The bench's 2-instance cluster: a throwaway redis-server and two of our relays on it.

Owns: starting redis-server and the instances bench-a (every binary) and bench-b (every phone)
on free loopback ports, pinned to --relay-cpu like a single relay; waiting until each instance
is ready (its `starting` line, Redis up on /healthz); what a run learns from them (connection
counts while loaded, their `pyrycode_relay_cluster_*` series, WARN/ERROR lines from their logs);
and the setup a result records.
Must never: bind anything but loopback, persist anything in Redis, or leave redis-server or an
instance running after the run (instances stop first, then Redis).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from pyrycode_relay.tools.bench import load
from pyrycode_relay.tools.bench.ports import free_ports
from pyrycode_relay.tools.bench.servers import Running, relay_flags
from pyrycode_relay.tools.bench.spawn import Child, relay, spawned

CLUSTER_INSTANCES = ("a", "b")  # every binary on bench-a, every phone on bench-b


def redis_argv(redis_server: str, port: int, workdir: str) -> list[str]:
    """A throwaway Redis on loopback: no persistence, nothing written but its log."""
    return [
        redis_server,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        workdir,
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _http_get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH (no proxy from the environment); (0, "") on error."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return 0, ""
    finally:
        conn.close()


def _instance_ready(instance: Child, port: int, instance_id: str) -> bool:
    """The instance logged `starting` (printed once its bus subscription is active) and its
    /healthz names it and says Redis is up."""
    if not instance.logged(" msg=starting "):
        return False
    status, body = _http_get(port, "/healthz")
    with contextlib.suppress(ValueError, AttributeError):
        cluster = json.loads(body).get("cluster") if status == 200 else {}
        return bool(cluster.get("instance_id") == instance_id and cluster.get("redis") == "up")
    return False


def cluster_metrics(metrics_port: int) -> dict[str, float]:
    """The instance's `pyrycode_relay_cluster_*` series (name{labels} → value)."""
    status, text = _http_get(metrics_port, "/metrics")
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in text.splitlines():
        if line.startswith("pyrycode_relay_cluster_"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name.removeprefix("pyrycode_relay_cluster_")] = float(value)
    return out


def _log_problems(log: str, limit: int = 10) -> list[str]:
    """The first WARN/ERROR lines an instance logged (a clean run has none)."""
    found: list[str] = []
    with contextlib.suppress(OSError), open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            if " level=WARN " in line or " level=ERROR " in line:
                found.append(line.rstrip("\n")[:300])
                if len(found) >= limit:
                    break
    return found


@contextlib.contextmanager
def started_cluster(args: argparse.Namespace) -> Iterator[Running]:
    """A fresh redis-server and two instances of our relay on it (bench-a holds every
    binary, bench-b every phone), all pinned to --relay-cpu like a single relay is (the
    same CPU budget for both), torn down in reverse order (instances, then Redis)."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("bench: the cluster run needs redis-server on PATH")
    with contextlib.ExitStack() as stack:
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix="cluster-", dir=args.keep_logs)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pyrycode-bench-"))
        redis_port, *ports = free_ports(1 + 2 * len(CLUSTER_INSTANCES))
        redis_log = os.path.join(tmp, "redis.log")
        redis = stack.enter_context(
            spawned(
                redis_argv(redis_server, redis_port, tmp),
                name="redis-server",
                cpu=args.relay_cpu,
                log=redis_log,
                ready=lambda: _redis_ping(redis_port),
                what="answer PING",
                timeout=10,
            )
        )
        url = f"redis://127.0.0.1:{redis_port}"
        procs: dict[str, Child] = {"redis": redis}
        listen: dict[str, tuple[int, int]] = {}
        logs: dict[str, str] = {}
        for i, name in enumerate(CLUSTER_INSTANCES):
            port, metrics_port = ports[2 * i], ports[2 * i + 1]
            listen[name] = (port, metrics_port)
            logs[name] = os.path.join(tmp, f"{name}.log")
            # Instances log to a file at info level in text form whatever --relay-arg
            # says: the `starting` line is the readiness signal, WARN/ERROR lines are
            # reported with the run.
            extra = ("--cluster-redis", url, "--instance-id", f"bench-{name}")
            flags = relay_flags(port, args, metrics_listen=f"127.0.0.1:{metrics_port}", extra=extra)
            flags += ["--log-level=info", "--log-format=text"]
            procs[name] = stack.enter_context(
                relay(
                    *flags,
                    port=port,
                    name=f"instance bench-{name}",
                    cpu=args.relay_cpu,
                    log=logs[name],
                )
            )
        for name in CLUSTER_INSTANCES:
            instance = procs[name]
            instance.wait_ready(
                functools.partial(_instance_ready, instance, listen[name][0], f"bench-{name}"),
                what="become ready (Redis up)",
                timeout=20,
            )
        time.sleep(0.3)

        seen: dict[str, Any] = {}

        def loaded() -> None:
            """Where the connections are while all are open: /healthz counts and the
            remote-phone gauge of each instance (binaries on a, phones on b, all remote)."""
            for n in CLUSTER_INSTANCES:
                status, body = _http_get(listen[n][0], "/healthz")
                health: Any = {}
                with contextlib.suppress(ValueError):
                    health = json.loads(body) if status == 200 else {}
                if not isinstance(health, dict):
                    health = {}
                seen[f"bench-{n}"] = {
                    "connected_binaries": health.get("connected_binaries"),
                    "connected_phones": health.get("connected_phones"),
                    "remote_phones": cluster_metrics(listen[n][1]).get("remote_phones"),
                }

        def after() -> dict[str, Any]:
            out: dict[str, Any] = {
                "while_loaded": seen,
                "cluster_metrics": {
                    f"bench-{n}": cluster_metrics(listen[n][1]) for n in CLUSTER_INSTANCES
                },
                "instance_log_problems": {
                    f"bench-{n}": _log_problems(logs[n]) for n in CLUSTER_INSTANCES
                },
            }
            exited = {n: c.proc.returncode for n, c in procs.items() if c.proc.poll() is not None}
            if exited:
                out["exited"] = exited  # the run is not ok: a process died under load
            if args.keep_logs:
                out["logs"] = tmp
            return out

        a, b = CLUSTER_INSTANCES
        yield Running(
            load.Target("127.0.0.1", listen[a][0], phone_port=listen[b][0]),
            {name: child.pid for name, child in procs.items()},
            loaded,
            after,
        )


def cluster_setup(args: argparse.Namespace) -> dict[str, Any]:
    redis_server = shutil.which("redis-server") or "redis-server"
    version = subprocess.run(
        [redis_server, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "redis_server": version,
        "instances": {
            "bench-a": "every binary (owns every server-id)",
            "bench-b": "every phone (none of their binaries is here)",
        },
        "cross_instance_frames_per_round_trip": 2,
        "relay_args": [*args.relay_arg, "--log-level=info", "--log-format=text"],
        "pinning": (
            "none (--no-pin)"
            if args.relay_cpu is None
            else "both instances and redis-server share relay_cpu, the CPU the single "
            "relay gets alone: the same server CPU budget in both configurations"
        ),
    }
