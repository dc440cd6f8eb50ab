"""Load balancers in front of a cluster: HAProxy and nginx, run from the deploy/ configs.

Owns: reading `deploy/haproxy.cfg` and `deploy/nginx.conf` (the files docs/cluster.md
shows) from the source checkout; turning one into a runnable config by changing only its
listen address and its three instances' addresses, and for the round-robin baseline its one
balancing line; the command line that runs each in the foreground with its pid and log files
in a given directory; and starting one through spawn.py (ready once it accepts connections).
The bench and the end-to-end tests both run the balancers through here, so both run the
documented text.
Must never: change a config beyond those lines, bind anything but loopback, or leave a
balancer process (nginx's workers included) running after its block.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from pyrycode_relay.tools.bench.spawn import Child, listening, spawned, spawned_async

KINDS = ("haproxy", "nginx")
# src/pyrycode_relay/tools/bench/balancer.py → the checkout's deploy/ directory.
DEPLOY = Path(__file__).resolve().parents[4] / "deploy"
FILES = {"haproxy": "haproxy.cfg", "nginx": "nginx.conf"}
# The addresses the deploy files are written for (docs/cluster.md's local 3-instance
# cluster): the balancer's own listener, then the three instances.
EXAMPLE_LISTEN = "127.0.0.1:8080"
EXAMPLE_INSTANCES = ("127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083")
# The line that makes each one hash X-Pyrycode-Server, and what the round-robin baseline
# puts there instead (nginx balances round-robin when an upstream names no method).
HASH_LINES = {
    "haproxy": "    balance hdr(X-Pyrycode-Server)\n",
    "nginx": "        hash $http_x_pyrycode_server consistent;\n",
}
ROUND_ROBIN_LINES = {"haproxy": "    balance roundrobin\n", "nginx": ""}


class ConfigDrift(ValueError):
    """A deploy file no longer has the exact lines the substitution expects."""


def deploy_file(kind: str) -> Path:
    path = DEPLOY / FILES[kind]
    if not path.is_file():
        raise SystemExit(f"bench: {path} is missing: balancer runs need a source checkout")
    return path


def _swap(text: str, old: str, new: str, name: str) -> str:
    if text.count(old) != 1:
        raise ConfigDrift(f"{name}: expected exactly one {old.strip()!r}")
    return text.replace(old, new)


def render(
    kind: str,
    listen_port: int,
    instance_ports: Sequence[int],
    *,
    round_robin: bool = False,
    text: str | None = None,
) -> str:
    """The deploy file of `kind` (or `text`) listening on 127.0.0.1:`listen_port` in front
    of the instances on 127.0.0.1:`instance_ports` (three), hashing, or round-robin when
    asked. Nothing else changes."""
    name = FILES[kind]
    if text is None:
        text = deploy_file(kind).read_text(encoding="utf-8")
    if len(instance_ports) != len(EXAMPLE_INSTANCES):
        raise ValueError(f"{name} is written for {len(EXAMPLE_INSTANCES)} instances")
    text = _swap(text, EXAMPLE_LISTEN, f"127.0.0.1:{listen_port}", name)
    for old, port in zip(EXAMPLE_INSTANCES, instance_ports, strict=True):
        text = _swap(text, old, f"127.0.0.1:{port}", name)
    if round_robin:
        text = _swap(text, HASH_LINES[kind], ROUND_ROBIN_LINES[kind], name)
    return text


def program(kind: str) -> str | None:
    """Where the balancer's program is (Debian installs both under /usr/sbin)."""
    return shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/usr/local/sbin")


def argv(kind: str, config: Path, workdir: Path) -> list[str]:
    """The balancer in the foreground, its pid file in `workdir`, its log on stderr."""
    exe = program(kind)
    if exe is None:
        raise SystemExit(f"bench: {kind} is not installed (apt install {kind})")
    if kind == "haproxy":
        # -db: stay in the foreground; the config logs to stdout.
        return [exe, "-db", "-f", str(config), "-p", str(workdir / "haproxy.pid")]
    # The pid file and the foreground mode are main-context settings, given here so the
    # deploy file need not name paths; -e sends the error log (before and after the config
    # is read) to stderr; -p makes relative paths land in `workdir`.
    return [
        exe,
        "-p",
        str(workdir),
        "-c",
        str(config),
        "-e",
        "stderr",
        "-g",
        f"daemon off; pid {workdir / 'nginx.pid'};",
    ]


def write_config(kind: str, workdir: Path, text: str) -> Path:
    path = workdir / FILES[kind]
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def started(
    kind: str,
    listen_port: int,
    instance_ports: Sequence[int],
    workdir: Path,
    *,
    round_robin: bool = False,
    cpu: int | None = None,
    log: str | None = None,
) -> Iterator[Child]:
    """The balancer running `render(...)` from `workdir`, accepting on `listen_port`;
    stopped with its workers when the block ends."""
    text = render(kind, listen_port, instance_ports, round_robin=round_robin)
    config = write_config(kind, workdir, text)
    with spawned(
        argv(kind, config, workdir),
        name=kind,
        cpu=cpu,
        log=log or os.fspath(workdir / f"{kind}.log"),
        ready=lambda: listening(listen_port),
        what="listen",
        timeout=10,
        grace=5,
    ) as child:
        yield child


@contextlib.asynccontextmanager
async def started_async(
    kind: str,
    listen_port: int,
    instance_ports: Sequence[int],
    workdir: Path,
    *,
    round_robin: bool = False,
) -> AsyncIterator[Child]:
    """`started` for a caller on an event loop."""
    text = render(kind, listen_port, instance_ports, round_robin=round_robin)
    config = write_config(kind, workdir, text)
    async with spawned_async(
        argv(kind, config, workdir),
        name=kind,
        log=os.fspath(workdir / f"{kind}.log"),
        ready=lambda: listening(listen_port),
        what="listen",
        timeout=10,
        grace=5,
    ) as child:
        yield child
