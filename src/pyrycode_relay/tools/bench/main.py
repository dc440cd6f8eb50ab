"""`pyrycode-relay bench`: run one scenario against one or more relays, write one JSON.

Owns: argument parsing, starting the relays it measures (our relay, the Go stand-in, the
same-stack echo server, a 2-instance cluster of ours on a throwaway redis-server) pinned to
one CPU while the bench pins itself to another, reading their CPU and RSS from /proc,
interleaving repetitions, and the JSON summary (medians per relay, ratios against the Go
relay, the echo ceiling, and cluster ÷ single instance).
Must never: target anything but a loopback address, leave a relay or redis-server it
started running, or run unbounded (every phase has a deadline; a run is at most warm-up +
duration + drain).

    pyrycode-relay bench closed --relay self,go,echo --go-relay /tmp/anchors/bin/go-relay
    pyrycode-relay bench open --relay self,go --phones 5000 --rate 1
    pyrycode-relay bench idle --relay self --connections 10000 --hold 65
    pyrycode-relay bench closed --url ws://127.0.0.1:8080 --pid 1234
    pyrycode-relay bench closed --cluster -d 8 --reps 3      # cross-instance vs single
    pyrycode-relay bench closed --url ws://127.0.0.1:8080 --phone-url ws://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyrycode_relay
from pyrycode_relay import __version__
from pyrycode_relay.tools.bench import load
from pyrycode_relay.tools.bench.ports import free_port, free_ports

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# -- /proc --------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of `pid` (all its threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuSampler:
    """A process's CPU share of one core between consecutive `sample()` calls."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.points: list[tuple[float, float]] = []

    def read(self) -> float | None:
        return proc_cpu_s(self.pid) if self.pid is not None else None

    def sample(self) -> None:
        cpu = self.read()
        if cpu is not None:
            self.points.append((time.perf_counter(), cpu))

    def pct(self) -> float | None:
        if len(self.points) < 2:
            return None
        (w0, c0), (w1, c1) = self.points[0], self.points[-1]
        return round(100 * (c1 - c0) / (w1 - w0), 1)


def machine_busy_s() -> float | None:
    """CPU time every CPU spent busy (not idle, iowait or stolen) since boot, seconds."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / CLK_TCK


class MachineSampler(CpuSampler):
    """The whole machine's busy CPU (% of one core): with the relays' and the client's
    share taken off, what else ran during the window (0 on a quiet machine)."""

    def __init__(self) -> None:
        super().__init__(None)

    def read(self) -> float | None:
        return machine_busy_s()


# -- relays -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "relay_version": __version__,
        **source_revision(),
    }


def source_revision() -> dict[str, Any]:
    """The git commit the measured code is at, when it runs from a checkout (and whether
    src/ had uncommitted changes): a figure is only comparable with the code it names."""
    src = os.path.dirname(os.path.abspath(pyrycode_relay.__file__))
    try:
        head = subprocess.run(
            ["git", "-C", src, "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", src, "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": head, "git_src_dirty": bool(dirty)}


def relay_argv(
    kind: str,
    port: int,
    args: argparse.Namespace,
    *,
    metrics_listen: str = "",
    extra: tuple[str, ...] = (),
) -> list[str]:
    listen = f"127.0.0.1:{port}"
    if kind == "self":
        return [
            sys.executable,
            "-m",
            "pyrycode_relay",
            "--insecure-listen",
            listen,
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
def _spawn(
    argv: list[str], cpu: int | None, log: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own session, pinned to `cpu` (if not None), its output to
    `log` (or nowhere); stopped with SIGTERM (SIGKILL after 10 s) when the block ends."""
    late_pin = False
    if cpu is not None:
        if shutil.which("taskset"):
            # taskset pins before exec, so every thread the child starts (Go's runtime
            # threads, redis-server's background threads) inherits the CPU; it then
            # execs, so the pid is the child's.
            argv = ["taskset", "-c", str(cpu), *argv]
        else:
            late_pin = True  # pins the main thread right after start: fine for Python
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        if late_pin:
            assert cpu is not None
            os.sched_setaffinity(proc.pid, {cpu})
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_listening(
    proc: subprocess.Popen[bytes], port: int, name: str, log: str | None = None
) -> None:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {name} exited with {proc.returncode}{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {name} did not listen within 20 s{_tail(log)}")
        time.sleep(0.05)


def _tail(log: str | None, lines: int = 10) -> str:
    if not log:
        return ""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            text = f.read().splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n  {line}" for line in text)


@contextlib.contextmanager
def started(kind: str, args: argparse.Namespace) -> Iterator[Running]:
    """A fresh relay of `kind` on a free loopback port, pinned to --relay-cpu."""
    if kind == "cluster":
        with started_cluster(args) as running:
            yield running
        return
    port = free_port()
    with _spawn(relay_argv(kind, port, args), args.relay_cpu) as proc:
        _wait_listening(proc, port, f"{kind} relay")
        time.sleep(0.3)  # let it finish start-up work before we measure its baseline
        yield Running(load.Target("127.0.0.1", port, echo=kind == "echo"), {"relay": proc.pid})


# -- a 2-instance cluster ----------------------------------------------------------

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


def _wait_instance(proc: subprocess.Popen[bytes], port: int, instance_id: str, log: str) -> None:
    """Until the instance logged `starting` (printed once its bus subscription is active)
    and its /healthz says Redis is up."""
    _wait_listening(proc, port, f"instance {instance_id}", log)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench: instance {instance_id} exited with {proc.returncode}")
        with open(log, encoding="utf-8", errors="replace") as f:
            started_line = any(" msg=starting " in line for line in f)
        if started_line:
            status, body = _http_get(port, "/healthz")
            with contextlib.suppress(ValueError, AttributeError):
                cluster = json.loads(body).get("cluster") if status == 200 else {}
                if cluster.get("instance_id") == instance_id and cluster.get("redis") == "up":
                    return
        if time.monotonic() > deadline:
            raise SystemExit(
                f"bench: instance {instance_id} not ready (Redis up) within 20 s{_tail(log)}"
            )
        time.sleep(0.05)


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
            _spawn(redis_argv(redis_server, redis_port, tmp), args.relay_cpu, redis_log)
        )
        deadline = time.monotonic() + 10
        while not _redis_ping(redis_port):
            if redis.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: redis-server did not start{_tail(redis_log)}")
            time.sleep(0.05)
        url = f"redis://127.0.0.1:{redis_port}"
        procs: dict[str, subprocess.Popen[bytes]] = {"redis": redis}
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
            argv = relay_argv(
                "self", port, args, metrics_listen=f"127.0.0.1:{metrics_port}", extra=extra
            )
            argv += ["--log-level=info", "--log-format=text"]
            procs[name] = stack.enter_context(_spawn(argv, args.relay_cpu, logs[name]))
        for name in CLUSTER_INSTANCES:
            _wait_instance(procs[name], listen[name][0], f"bench-{name}", logs[name])
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
            exited = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            if exited:
                out["exited"] = exited  # the run is not ok: a process died under load
            if args.keep_logs:
                out["logs"] = tmp
            return out

        a, b = CLUSTER_INSTANCES
        yield Running(
            load.Target("127.0.0.1", listen[a][0], phone_port=listen[b][0]),
            {name: proc.pid for name, proc in procs.items()},
            loaded,
            after,
        )


def _loopback(url: str, flag: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "ws" or host not in LOOPBACK or parts.port is None:
        raise SystemExit(f"bench: {flag} must be ws://<loopback>:PORT")
    return "::1" if host == "::1" else "127.0.0.1", parts.port


@contextlib.contextmanager
def given(args: argparse.Namespace) -> Iterator[Running]:
    """Relays someone else started: --url (binaries, and phones unless --phone-url)."""
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
    yield Running(target, procs)


# -- scenarios ----------------------------------------------------------------------


async def run_scenario(
    args: argparse.Namespace, running: Running, rate: float | None = None
) -> dict[str, Any]:
    target, procs = running.target, running.procs
    samplers = {name: CpuSampler(pid) for name, pid in procs.items()}
    machine_sampler = MachineSampler()

    def sample() -> None:
        machine_sampler.sample()
        for sampler in samplers.values():
            sampler.sample()

    if args.scenario == "closed":
        out = await load.closed_loop(
            target,
            b=args.b,
            p=args.p,
            d=args.d,
            size=args.size,
            warmup=args.warmup,
            dur=args.dur,
            sample=sample,
            loaded=running.loaded,
        )
    elif args.scenario == "open":
        assert rate is not None
        out = await load.open_loop(
            target,
            phones_n=args.phones,
            per_binary=args.p,
            rate=rate,
            size=args.size,
            warmup=args.warmup,
            dur=args.dur,
            sample=sample,
            loaded=running.loaded,
        )
    else:
        pid = procs.get("relay")
        sampler = CpuSampler(pid)

        async def cpu_window(seconds: float) -> float | None:
            sampler.sample()
            await asyncio.sleep(seconds)
            sampler.sample()
            return sampler.pct()

        def rss() -> int | None:
            return proc_rss_kib(pid) if pid is not None else None

        return await load.idle(
            target,
            connections=args.connections,
            per_binary=args.p,
            hold=args.hold,
            settle=args.settle,
            rss=rss,
            cpu_window=cpu_window,
        )
    # Server-side CPU and RSS: the sum over every process that serves the load (one
    # relay, or both cluster instances and redis-server), and each apart when several.
    cpu = {name: sampler.pct() for name, sampler in samplers.items()}
    rss_kib = {name: proc_rss_kib(pid) for name, pid in procs.items()}
    out["relay_cpu_pct"] = _total(cpu)
    if procs:
        out["relay_rss_kib"] = _total(rss_kib)
    if len(procs) > 1:
        for name in procs:
            out[f"relay_cpu_pct_{name}"] = cpu[name]
            out[f"relay_rss_kib_{name}"] = rss_kib[name]
    total_cpu, rps = out["relay_cpu_pct"], out["rps"]
    busy = machine_sampler.pct()
    if busy is not None and total_cpu is not None and args.scenario == "closed":
        # Anything but the measured servers and this client (another job on a shared
        # machine) shows up here; a few % is the kernel's own work. Closed loop only:
        # /proc/stat is sampled per clock tick, and the open-loop scheduler, which wakes
        # and sleeps between ticks, makes the figure swing ±50 % on an idle machine.
        out["other_cpu_pct"] = round(busy - total_cpu - out["client_cpu_pct"], 1)
    # Server CPU per round trip: the cost figure that does not depend on who saturates.
    out["relay_cpu_us_per_rt"] = round(total_cpu * 1e4 / rps, 1) if total_cpu and rps else None
    return out


def _total(values: dict[str, Any]) -> Any:
    """The sum (rounded like the parts), or None if any part is unknown or there is none."""
    if not values or any(v is None for v in values.values()):
        return None
    total = sum(values.values())
    return round(total, 1) if isinstance(total, float) else total


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(nums), 3) if nums else None


SUMMARY_KEYS = {
    "closed": (
        "rps",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "relay_cpu_pct",
        "relay_cpu_us_per_rt",
        "client_cpu_pct",
        "other_cpu_pct",
    ),
    "open": (
        "rps",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "service_p50_ms",
        "service_p99_ms",
        "send_lag_p99_ms",
        "relay_cpu_pct",
        "relay_cpu_us_per_rt",
        "client_cpu_pct",
    ),
    "idle": (
        "kib_per_conn",
        "rss_before_kib",
        "rss_loaded_kib",
        "handshakes_per_s",
        "relay_idle_cpu_pct",
        "client_cpu_pct",
        "pings_answered",
    ),
}
PER_PROCESS = ("relay_cpu_pct_", "relay_rss_kib_")  # cluster runs: each process apart


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for tag in dict.fromkeys((r["relay"], r.get("rate")) for r in runs):
        rs = [r["result"] for r in runs if (r["relay"], r.get("rate")) == tag]
        key = tag[0] if tag[1] is None else f"{tag[0]}@{tag[1]:g}"
        keys = list(SUMMARY_KEYS[scenario])
        keys += [k for k in dict.fromkeys(k for r in rs for k in r) if k.startswith(PER_PROCESS)]
        g: dict[str, Any] = {k: _median([r.get(k) for r in rs]) for k in keys}
        g["runs"] = len(rs)
        g["ok"] = all(r.get("ok") for r in rs)
        g["client_bound_runs"] = sum(bool(r.get("client_bound")) for r in rs)
        if scenario != "idle":
            g["rps_min_max"] = [min(r["rps"] for r in rs), max(r["rps"] for r in rs)]
        groups[key] = g
    ratios: dict[str, float | None] = {}
    for key, g in groups.items():
        relay, _, rate = key.partition("@")
        suffix = f"@{rate}" if rate else ""
        if relay == "cluster":
            single = groups.get("self" + suffix)
            if single is not None:
                for k in ("rps", "p50_ms", "p99_ms", "relay_cpu_us_per_rt"):
                    ratios[f"{k}_cluster_over_self{suffix}"] = _ratio(g[k], single[k])
            continue
        if relay != "self":
            continue
        go = groups.get("go" + suffix)
        echo = groups.get("echo" + suffix)
        if go is not None:
            for k in ("rps", "p99_ms", "kib_per_conn"):
                if k in g:
                    ratios[f"{k}_self_over_go{suffix}"] = _ratio(g[k], go[k])
        if echo is not None and "rps" in g:
            ratios[f"rps_self_over_echo{suffix}"] = _ratio(g["rps"], echo["rps"])
    out: dict[str, Any] = {"relays": groups, "ratios": ratios}
    if any(key.partition("@")[0] == "cluster" for key in groups):
        out["cluster"] = cluster_comparison(groups)
    return out


def _figures(g: dict[str, Any]) -> dict[str, Any]:
    rps = g["rps"]
    return {
        "round_trips_per_s": rps,
        "frames_per_s": round(2 * rps, 1) if rps is not None else None,
        "p50_ms": g["p50_ms"],
        "p99_ms": g["p99_ms"],
        "relay_cpu_pct": g["relay_cpu_pct"],
        "relay_cpu_us_per_rt": g["relay_cpu_us_per_rt"],
        "ok": g["ok"],
    }


def cluster_comparison(groups: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Cross-instance figures next to the single instance's of the same run, and the
    ratios cross ÷ single (medians over repetitions). A round trip is one phone frame
    and its echo: both cross from one instance to the other, so frames/s = 2 * rps."""
    rows: list[dict[str, Any]] = []
    for key, g in groups.items():
        relay, _, rate = key.partition("@")
        if relay != "cluster":
            continue
        single = groups.get("self" + (f"@{rate}" if rate else ""))
        row: dict[str, Any] = {"rate_per_phone": float(rate)} if rate else {}
        row["cross_instance"] = _figures(g)
        row["single_instance"] = _figures(single) if single is not None else None
        if single is not None:
            cross, one = row["cross_instance"], row["single_instance"]
            row["ratio_cross_over_single"] = {
                k: _ratio(cross[k], one[k])
                for k in ("frames_per_s", "p50_ms", "p99_ms", "relay_cpu_us_per_rt")
            }
        rows.append(row)
    return rows


def cluster_line(row: dict[str, Any]) -> str:
    """One human line per comparison row (stderr)."""
    cross, one = row["cross_instance"], row["single_instance"]
    rate = f" @{row['rate_per_phone']:g}/s per phone" if "rate_per_phone" in row else ""
    text = (
        f"cluster{rate}: cross-instance {cross['frames_per_s']} frames/s "
        f"p50 {cross['p50_ms']} ms p99 {cross['p99_ms']} ms"
    )
    if one is not None:
        r = row["ratio_cross_over_single"]
        text += (
            f"; single instance {one['frames_per_s']} frames/s p50 {one['p50_ms']} ms "
            f"p99 {one['p99_ms']} ms; ratio cross/single frames/s {r['frames_per_s']} "
            f"p50 {r['p50_ms']} p99 {r['p99_ms']}"
        )
    return text


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="pyrycode-relay bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("scenario", choices=("closed", "open", "idle"))
    ap.add_argument(
        "--relay",
        default="self",
        help="comma list of relays to start: self, go, echo, cluster (default self)",
    )
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="also run a 2-instance cluster (closed, open): a fresh redis-server and two "
        "of our relays on it, every binary on one and every phone on the other, next to "
        "the single relay (self) in the same run; needs redis-server on PATH",
    )
    ap.add_argument(
        "--keep-logs",
        metavar="DIR",
        help="keep each cluster run's instance and redis-server logs in a new directory "
        "under DIR (default: a temporary directory, removed)",
    )
    ap.add_argument("--url", help="measure a running relay instead (ws://127.0.0.1:PORT)")
    ap.add_argument("--pid", type=int, help="with --url: the relay's pid for CPU and RSS")
    ap.add_argument(
        "--phone-url",
        help="with --url: connect the phones here instead (another instance of a cluster)",
    )
    ap.add_argument("--phone-pid", type=int, help="with --phone-url: that instance's pid")
    ap.add_argument(
        "--go-relay",
        default=os.environ.get("PYRYCODE_BENCH_GO_RELAY", ""),
        help="path of the Go stand-in relay binary",
    )
    ap.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        help="extra flag for our relay (repeatable, e.g. --relay-arg=--log-level=error)",
    )
    ap.add_argument("--heartbeat-interval", default="30s", help="our relay's heartbeat [30s]")
    ap.add_argument(
        "--echo-write-high",
        type=int,
        default=1 << 20,
        help="echo server's send-buffer allowance; 0 = one write per frame like phones",
    )
    ap.add_argument("--relay-cpu", type=int, help="default: the first CPU we may use")
    ap.add_argument("--bench-cpu", type=int, help="default: the second CPU we may use")
    ap.add_argument("--no-pin", action="store_true", help="do not pin relay or bench")
    ap.add_argument("--reps", type=int, default=1, help="interleaved repetitions per relay")
    ap.add_argument("-b", type=int, default=10, help="binaries (closed)")
    ap.add_argument("-p", type=int, default=10, help="phones per binary")
    ap.add_argument("-d", type=int, default=1, help="frames in flight per phone (closed)")
    ap.add_argument("--size", type=int, default=64, help="phone frame bytes")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--dur", type=float, default=5.0)
    ap.add_argument("--phones", type=int, default=5000, help="phones (open)")
    ap.add_argument("--rate", default="1", help="frames/s per phone, comma list (open)")
    ap.add_argument("--connections", type=int, default=10000, help="total (idle)")
    ap.add_argument("--hold", type=float, default=65.0, help="idle hold seconds")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before the RSS read")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    if args.p > 16 or args.p < 1:
        ap.error("-p must be 1..16 (the per-server-id phone cap)")
    if args.dur <= 0 or args.dur > 600 or args.hold > 600 or args.reps > 20:
        ap.error("bounded runs only: --dur/--hold ≤ 600 s, --reps ≤ 20")
    if args.connections > 30000 or args.b * args.p > 20000 or args.phones > 20000:
        ap.error("at most 30,000 connections")
    relays = [r.strip() for r in args.relay.split(",") if r.strip()]
    if args.cluster:
        relays += [r for r in ("self", "cluster") if r not in relays]
    args.relays = ["url"] if args.url else relays
    if "cluster" in args.relays and args.scenario == "idle":
        ap.error("the cluster run is for closed and open only")
    if args.url and args.cluster:
        ap.error("--cluster starts its own instances; --url with --phone-url measures yours")
    if args.phone_url and not args.url:
        ap.error("--phone-url needs --url")
    if args.phone_pid is not None and not args.phone_url:
        ap.error("--phone-pid needs --phone-url")
    if args.phone_url and args.scenario == "idle":
        ap.error("--phone-url is for closed and open only")
    allowed = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(allowed) < 2:
        args.relay_cpu = args.bench_cpu = None
    else:
        if args.relay_cpu is None:
            args.relay_cpu = allowed[0]
        if args.bench_cpu is None:
            args.bench_cpu = next(c for c in allowed if c != args.relay_cpu)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    if args.bench_cpu is not None:
        os.sched_setaffinity(0, {args.bench_cpu})
    rates = [float(r) for r in args.rate.split(",")] if args.scenario == "open" else [None]
    relays: list[str] = args.relays
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = relays if rep % 2 == 0 else relays[::-1]
        for rate in rates:
            for kind in order:
                if args.scenario == "idle" and kind == "echo":
                    continue
                ctx = given(args) if kind == "url" else started(kind, args)
                with ctx as running:
                    result = _run(run_scenario(args, running, rate))
                    extra = running.after()
                if extra.get("exited"):
                    result["ok"] = False  # a server process died under the load
                result.update(extra)
                entry: dict[str, Any] = {"relay": kind, "rep": rep + 1, "result": result}
                if rate is not None:
                    entry["rate"] = rate
                runs.append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)
    summary = summarise(args.scenario, runs)
    pinning: dict[str, Any] = {"relay_cpu": args.relay_cpu, "bench_cpu": args.bench_cpu}
    doc: dict[str, Any] = {
        "bench": args.scenario,
        "argv": argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "pinning": pinning,
        **summary,
        "all_ok": all(r["result"].get("ok") for r in runs),
        "runs": runs,
    }
    if "cluster" in relays:
        if args.relay_cpu is not None:
            pinning["cluster"] = "bench-a, bench-b and redis-server all on relay_cpu"
        doc["cluster_setup"] = cluster_setup(args)
    text = json.dumps(doc, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    for row in summary.get("cluster", []):
        print(cluster_line(row), file=sys.stderr)
    return 0 if doc["all_ok"] else 1


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
