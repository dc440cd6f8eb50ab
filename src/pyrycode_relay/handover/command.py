"""`pyrycode-relay upgrade PID`: ask a running relay to hand over to a new process, and wait.

Owns: sending SIGUSR2 to PID and telling, from /proc, how it went: the relay starts its
successor as its child; PID exiting means the successor took over (exit 0, its pid printed);
the child vanishing while PID serves on means the handover failed (exit 1; the relay's log
line `handover failed; serving on` says why); neither within --wait is exit 1 too.
Must never: signal anything but the given pid, or wait without a deadline.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

POLL = 0.05


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return {int(x) for x in f.read().split()}
    except (OSError, ValueError):
        return set()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pyrycode-relay upgrade",
        description="Hand a running relay's listeners and connections to a new process "
        "started from the installed code (SIGUSR2), and wait for the outcome.",
    )
    ap.add_argument("pid", type=int, help="the running relay's pid (systemd: MainPID)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the outcome [60]")
    args = ap.parse_args(argv)
    pid: int = args.pid
    if pid <= 1 or not _running(pid):
        print(f"upgrade: no running process {pid}", file=sys.stderr)
        return 1
    before = _children(pid)
    seen: set[int] = set()
    try:
        os.kill(pid, signal.SIGUSR2)
    except OSError as exc:  # another user's process, or gone meanwhile
        print(f"upgrade: cannot signal {pid}: {exc.strerror}", file=sys.stderr)
        return 1
    end = time.monotonic() + args.wait
    while time.monotonic() < end:
        children = _children(pid) - before
        if not _running(pid):
            successor = max(seen, default=0)
            if successor and _running(successor):
                print(f"upgraded: {pid} handed over to {successor}")
                return 0
            print(f"upgrade: {pid} exited; no successor is running", file=sys.stderr)
            return 1
        if seen and not children:
            print(
                f"upgrade: the handover failed; {pid} serves on (its log says why)",
                file=sys.stderr,
            )
            return 1
        seen |= children
        time.sleep(POLL)
    print(f"upgrade: no outcome within {args.wait:g} s; {pid} is running", file=sys.stderr)
    return 1
