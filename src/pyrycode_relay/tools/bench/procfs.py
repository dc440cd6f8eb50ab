"""The one reader of /proc for the tools: a process's CPU time, resident set and open file
descriptors, the machine's busy CPU, and what the machine is.

Owns: reading `/proc/<pid>/stat` (CPU seconds), `/proc/<pid>/status` (VmRSS), `/proc/<pid>/fd`,
`/proc/stat` (machine busy time) and `/proc/cpuinfo`; the samplers that turn two CPU readings
into a share of one core; the machine and source revision a bench result names. The bench, the
soak and the memory tool read a process only through here.
Must never: signal, trace or otherwise touch the process it reads, or read a relay's memory
any other way than /proc.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from typing import Any

import pyrycode_relay
from pyrycode_relay import __version__

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of `pid` (all its threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int | None:
    """VmRSS of `pid`, KiB; None once the process is gone (a zombie has no VmRSS)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def live_rss_kib(pid: int) -> int:
    """`proc_rss_kib` of a process that must still be running: a gone one is an error."""
    rss = proc_rss_kib(pid)
    if rss is None:
        raise RuntimeError(f"no VmRSS for pid {pid}: the process is gone")
    return rss


def fd_count(pid: int) -> int:
    """How many file descriptors `pid` holds right now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


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
