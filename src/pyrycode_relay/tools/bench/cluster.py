"""The bench's clusters: a throwaway redis-server and instances of our relay on it.

Owns: starting redis-server and N instances on free loopback ports, pinned to --relay-cpu
like a single relay, and waiting until each is ready (its `starting` line, Redis up on
/healthz); the two setups a run measures: the 2-instance cluster (bench-a holds every binary,
bench-b every phone: every frame crosses) and three instances behind a load balancer
(balancer.py starts it from its deploy file, hashing or round-robin); what a run learns from
the instances (connection counts while loaded, their `pyrycode_relay_cluster_*` series,
WARN/ERROR lines from their logs, and the bus share: bus messages per forwarded frame, from
/metrics before and after, also for instances someone else started); and the setup a result
records.
Must never: bind or scrape anything but loopback, persist anything in Redis, or leave
redis-server, an instance or a balancer running after the run (the balancer stops first,
then the instances, then Redis).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pyrycode_relay.tools.bench import balancer, load
from pyrycode_relay.tools.bench.ports import free_port, free_ports
from pyrycode_relay.tools.bench.servers import Running, relay_flags
from pyrycode_relay.tools.bench.spawn import Child, relay, spawned

CLUSTER_INSTANCES = ("a", "b")  # every binary on bench-a, every phone on bench-b
BALANCED_INSTANCES = ("1", "2", "3")  # behind a balancer: where the balancer sends them
CLUSTER_PREFIX = "pyrycode_relay_cluster_"
BUS_PUBLISHED = 'pyrycode_relay_cluster_bus_messages_total{direction="publish"}'
FRAMES_FORWARDED = "pyrycode_relay_frames_forwarded_total{"


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


def metrics(metrics_port: int) -> dict[str, float]:
    """The instance's /metrics (name{labels} → value); empty when it does not answer."""
    status, text = _http_get(metrics_port, "/metrics")
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def cluster_metrics(metrics_port: int) -> dict[str, float]:
    """The instance's `pyrycode_relay_cluster_*` series, without that prefix."""
    return {
        k.removeprefix(CLUSTER_PREFIX): v
        for k, v in metrics(metrics_port).items()
        if k.startswith(CLUSTER_PREFIX)
    }


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


@dataclass
class Instances:
    """A running redis-server and the instances on it: their children (and Redis's, under
    "redis"), listener and metrics ports, and log files, by short name."""

    tmp: str
    procs: dict[str, Child]
    listen: dict[str, tuple[int, int]]
    logs: dict[str, str]

    @property
    def names(self) -> list[str]:
        return list(self.listen)

    def scrape(self) -> list[dict[str, float]]:
        """Every instance's /metrics, parsed."""
        return [metrics(self.listen[n][1]) for n in self.names]

    def placement(self, seen: dict[str, Any]) -> None:
        """Where the connections are right now: /healthz counts and the remote-phone gauge
        of each instance, into `seen`."""
        for n in self.names:
            status, body = _http_get(self.listen[n][0], "/healthz")
            health: Any = {}
            with contextlib.suppress(ValueError):
                health = json.loads(body) if status == 200 else {}
            if not isinstance(health, dict):
                health = {}
            seen[f"bench-{n}"] = {
                "connected_binaries": health.get("connected_binaries"),
                "connected_phones": health.get("connected_phones"),
                "remote_phones": cluster_metrics(self.listen[n][1]).get("remote_phones"),
            }

    def report(self, args: argparse.Namespace) -> dict[str, Any]:
        """Their cluster series and WARN/ERROR lines, and which process died, if any."""
        out: dict[str, Any] = {
            "cluster_metrics": {
                f"bench-{n}": cluster_metrics(self.listen[n][1]) for n in self.names
            },
            "instance_log_problems": {
                f"bench-{n}": _log_problems(self.logs[n]) for n in self.names
            },
        }
        exited = {n: c.proc.returncode for n, c in self.procs.items() if c.proc.poll() is not None}
        if exited:
            out["exited"] = exited  # the run is not ok: a process died under the load
        if args.keep_logs:
            out["logs"] = self.tmp
        return out


@contextlib.contextmanager
def started_instances(args: argparse.Namespace, names: tuple[str, ...]) -> Iterator[Instances]:
    """A fresh redis-server and one instance of our relay per name (instance id
    `bench-<name>`), all pinned to --relay-cpu like a single relay is (the same CPU budget),
    ready (Redis up on each /healthz), torn down in reverse order (instances, then Redis)."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("bench: the cluster run needs redis-server on PATH")
    with contextlib.ExitStack() as stack:
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix="cluster-", dir=args.keep_logs)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pyrycode-bench-"))
        redis_port, *ports = free_ports(1 + 2 * len(names))
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
        for i, name in enumerate(names):
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
        for name in names:
            instance = procs[name]
            instance.wait_ready(
                functools.partial(_instance_ready, instance, listen[name][0], f"bench-{name}"),
                what="become ready (Redis up)",
                timeout=20,
            )
        time.sleep(0.3)
        yield Instances(tmp, procs, listen, logs)


@contextlib.contextmanager
def started_cluster(args: argparse.Namespace) -> Iterator[Running]:
    """A fresh redis-server and two instances of our relay on it: bench-a holds every
    binary, bench-b every phone."""
    with started_instances(args, CLUSTER_INSTANCES) as cluster:
        seen: dict[str, Any] = {}

        def after() -> dict[str, Any]:
            return {"while_loaded": seen, **cluster.report(args)}

        a, b = CLUSTER_INSTANCES
        yield Running(
            load.Target("127.0.0.1", cluster.listen[a][0], phone_port=cluster.listen[b][0]),
            {name: child.pid for name, child in cluster.procs.items()},
            functools.partial(cluster.placement, seen),
            after,
        )


@contextlib.contextmanager
def started_balanced(args: argparse.Namespace, kind: str) -> Iterator[Running]:
    """Three instances on a fresh redis-server behind a balancer started from its deploy
    file: `kind` is `<balancer>-hash` (the file as documented) or `<balancer>-roundrobin`
    (its balancing line swapped for round-robin, the baseline). Binaries and phones all
    dial the balancer; the run reports where they landed and the bus share."""
    program, _, mode = kind.partition("-")
    with started_instances(args, BALANCED_INSTANCES) as cluster:
        port = free_port()
        lb = balancer.started(
            program,
            port,
            [cluster.listen[n][0] for n in cluster.names],
            Path(cluster.tmp),
            round_robin=mode == "roundrobin",
            cpu=args.relay_cpu,
        )
        with lb as child:
            procs = {name: c.pid for name, c in cluster.procs.items()}
            procs["balancer"] = child.pid
            before = cluster.scrape()
            seen: dict[str, Any] = {}
            share: dict[str, Any] = {}

            def loaded() -> None:
                cluster.placement(seen)
                share.update(bus_share(before, cluster.scrape()))

            def after() -> dict[str, Any]:
                out = {"while_loaded": seen, **share, **cluster.report(args)}
                if child.proc.poll() is not None:
                    out.setdefault("exited", {})["balancer"] = child.proc.returncode
                return out

            yield Running(load.Target("127.0.0.1", port), procs, loaded, after)


def given_instances(urls: list[str]) -> tuple[Callable[[], None], Callable[[], dict[str, Any]]]:
    """The bus share of instances someone else started (--instance-metrics): scraped now,
    and again by the `loaded` hook; `after` reports it."""
    ports = [_metrics_port(u) for u in urls]
    before = [metrics(p) for p in ports]
    share: dict[str, Any] = {}

    def loaded() -> None:
        share.update(bus_share(before, [metrics(p) for p in ports]))

    return loaded, lambda: dict(share)


def _metrics_port(url: str) -> int:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or not parts.port:
        raise SystemExit("bench: --instance-metrics takes http://127.0.0.1:PORT/metrics URLs")
    if parts.path not in ("", "/metrics"):
        raise SystemExit("bench: --instance-metrics URLs end in /metrics")
    return parts.port


def bus_share(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, Any]:
    """Messages the instances put on the bus, and frames they forwarded, between two
    scrapes of every instance; their ratio is the share of frames that crossed the bus (a
    split pair's frame is one message; control messages such as a remote phone's admission
    count too, so it is an upper bound, and 0 means nothing crossed)."""

    def total(scrapes: list[dict[str, float]], prefix: str) -> float:
        return sum(v for m in scrapes for k, v in m.items() if k.startswith(prefix))

    published = total(after, BUS_PUBLISHED) - total(before, BUS_PUBLISHED)
    frames = total(after, FRAMES_FORWARDED) - total(before, FRAMES_FORWARDED)
    return {
        "bus_messages": int(published),
        "frames_forwarded": int(frames),
        "bus_fraction": round(published / frames, 4) if frames > 0 else None,
    }


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


def balanced_setup(args: argparse.Namespace) -> dict[str, Any]:
    """What a balancer run was: the program's version, the deploy file it ran and what the
    round-robin baseline changed in it."""
    kind = args.balancer
    exe = balancer.program(kind) or kind
    proc = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False)
    version = (proc.stdout or proc.stderr).strip().splitlines()[:1]
    return {
        "balancer": kind,
        "version": version[0] if version else None,
        "config": f"deploy/{balancer.FILES[kind]} (addresses and ports changed only)",
        "hash_line": balancer.HASH_LINES[kind].strip(),
        "roundrobin_line": balancer.ROUND_ROBIN_LINES[kind].strip() or "(removed)",
        "instances": [f"bench-{n}" for n in BALANCED_INSTANCES],
        "redis_server": cluster_setup(args)["redis_server"],
        "bus_fraction": "bus messages published / frames forwarded, summed over the "
        "instances, between a scrape before the load and one after it drained",
    }
