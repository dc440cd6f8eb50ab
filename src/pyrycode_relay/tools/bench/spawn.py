"""Starting and stopping the processes the bench measures: relays, the echo server, redis-server.

Owns: starting a child in its own session, pinned to a CPU when asked, its output to a log file
(or nowhere); waiting until it listens; stopping it (SIGTERM, SIGKILL after 10 s) when its block
ends.
Must never: leave a child running after its block ends, or wait without a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator


@contextlib.contextmanager
def spawned(
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


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, name: str, log: str | None = None
) -> None:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {name} exited with {proc.returncode}{tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {name} did not listen within 20 s{tail(log)}")
        time.sleep(0.05)


def tail(log: str | None, lines: int = 10) -> str:
    if not log:
        return ""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            text = f.read().splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n  {line}" for line in text)
