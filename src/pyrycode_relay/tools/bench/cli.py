"""`pyrycode-relay bench`: run one scenario against one or more relays, write one JSON.

Owns: argument parsing, pinning the bench to one CPU while the relays it measures (our
relay, the Go stand-in, the same-stack echo server, a 2-instance cluster of ours on a
throwaway redis-server, three instances behind HAProxy hashing or round-robin) get another,
interleaving repetitions, and writing the one JSON: the machine, every run, and the summary
(medians per relay, ratios against the Go relay, the echo ceiling, cluster ÷ single instance,
and hash ÷ round-robin behind a balancer).
Must never: target anything but a loopback address, leave a relay or redis-server it
started running, or run unbounded (every phase has a deadline; a run is at most warm-up +
duration + drain).

    pyrycode-relay bench closed --relay self,go,echo --go-relay /tmp/anchors/bin/go-relay
    pyrycode-relay bench open --relay self,go --phones 5000 --rate 1
    pyrycode-relay bench idle --relay self --connections 10000 --hold 65
    pyrycode-relay bench closed --url ws://127.0.0.1:8080 --pid 1234
    pyrycode-relay bench closed --cluster -d 8 --reps 3      # cross-instance vs single
    pyrycode-relay bench closed --url ws://127.0.0.1:8080 --phone-url ws://127.0.0.1:8081
    pyrycode-relay bench closed --balancer haproxy --reps 3  # hash vs round-robin, 3 instances
    pyrycode-relay bench closed --url ws://127.0.0.1:8080 --balancer-pid 4321 \\
        --instance-metrics http://127.0.0.1:9091/metrics,http://127.0.0.1:9092/metrics
    pyrycode-relay bench soak --seconds 600 --connections 200    # leak check (soak.py)
    pyrycode-relay bench memory --connections 10000              # RSS growth (memory.py)
    pyrycode-relay bench handover --connections 10000   # live handover mid-load (handover.py)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

from pyrycode_relay.tools.bench.cluster import (
    balanced_setup,
    cluster_setup,
    given_instances,
    started_balanced,
    started_cluster,
)
from pyrycode_relay.tools.bench.procfs import machine
from pyrycode_relay.tools.bench.scenarios import run_scenario
from pyrycode_relay.tools.bench.servers import Running, given, started
from pyrycode_relay.tools.bench.spawn import SpawnError
from pyrycode_relay.tools.bench.summary import balancer_line, cluster_line, summarise

# nginx is left out: its CPU is spread over worker processes the /proc reader does not sum.
BALANCED = ("haproxy-hash", "haproxy-roundrobin")


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@contextlib.contextmanager
def servers(kind: str, args: argparse.Namespace) -> Iterator[Running]:
    """What one run measures: the relays given by --url, the cluster, three instances
    behind a balancer, or one server (self, go, echo) started alone. A server that cannot
    start ends the bench with its log."""
    chosen: contextlib.AbstractContextManager[Running]
    if kind == "url":
        chosen = given(args)
    elif kind == "cluster":
        chosen = started_cluster(args)
    elif kind in BALANCED:
        chosen = started_balanced(args, kind)
    else:
        chosen = started(kind, args)
    try:
        with chosen as running:
            if kind == "url" and args.instance_metrics:
                running.loaded, running.after = given_instances(args.instance_metrics)
            yield running
    except SpawnError as exc:
        raise SystemExit(f"bench: {exc}") from None


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="pyrycode-relay bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "scenario",
        choices=("closed", "open", "idle"),
        help="what to measure (soak and memory take their own flags: bench soak --help)",
    )
    ap.add_argument(
        "--relay",
        help="comma list of relays to start: self, go, echo, cluster (default self, or "
        "none with --balancer)",
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
        "--balancer",
        choices=("haproxy",),
        help="run three instances on a fresh redis-server behind this load balancer, started "
        "from its deploy/ file (a source checkout): hashing X-Pyrycode-Server as documented, "
        "then with round-robin instead, in the same run; reports the share of frames that "
        "crossed the bus and the balancer's CPU; needs redis-server and the balancer on PATH",
    )
    ap.add_argument(
        "--instance-metrics",
        type=lambda v: [u.strip() for u in v.split(",") if u.strip()],
        default=[],
        metavar="URL,...",
        help="with --url: every instance's /metrics (http://127.0.0.1:PORT/metrics), scraped "
        "before and after the load, for the share of frames that crossed the bus",
    )
    ap.add_argument(
        "--balancer-pid", type=int, help="with --url: the balancer's pid, for its CPU share"
    )
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
    default = "" if args.balancer else "self"
    relays = [r.strip() for r in (args.relay or default).split(",") if r.strip()]
    if args.cluster:
        relays += [r for r in ("self", "cluster") if r not in relays]
    if args.balancer:
        relays += [f"{args.balancer}-{m}" for m in ("hash", "roundrobin")]
    args.relays = ["url"] if args.url else relays
    if args.balancer and (args.url or args.scenario == "idle"):
        ap.error("--balancer starts its own setup, for closed and open only")
    if (args.instance_metrics or args.balancer_pid is not None) and not args.url:
        ap.error("--instance-metrics and --balancer-pid need --url")
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


def raise_fd_limit() -> None:
    """Up to the hard limit of open files; the relays started from here inherit it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> int:
    if argv[:1] == ["handover"]:
        from pyrycode_relay.tools.bench.handover import main as handover_main

        raise_fd_limit()
        return handover_main(argv[1:])
    if argv[:1] == ["soak"]:
        from pyrycode_relay.tools.bench.soak import main as soak_main

        return soak_main(argv[1:])
    if argv[:1] == ["memory"]:
        from pyrycode_relay.tools.bench.memory import main as memory_main

        return memory_main(argv[1:])
    args = parse(argv)
    raise_fd_limit()
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
                with servers(kind, args) as running:
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
    if args.balancer:
        if args.relay_cpu is not None:
            pinning["balanced"] = "the 3 instances, redis-server and the balancer on relay_cpu"
        doc["balancer_setup"] = balanced_setup(args)
    text = json.dumps(doc, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    for row in summary.get("cluster", []):
        print(cluster_line(row), file=sys.stderr)
    for row in summary.get("balancer", []):
        print(balancer_line(row), file=sys.stderr)
    return 0 if doc["all_ok"] else 1
