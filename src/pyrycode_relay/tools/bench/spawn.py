"""Starting and stopping the processes a tool measures: our relay, the Go stand-in, the echo
server, redis-server.

Owns: our relay's command line (this interpreter, `-m pyrycode_relay`, then the flags) and the
environment it starts in; starting a child in its own session, pinned to a CPU when asked, its
stdout and stderr in a log file (the caller's, or a temporary one); waiting until it is ready,
failing at once with the tail of its log when it exits first; and stopping it (SIGTERM, then
SIGKILL after a grace period, both to its whole process group, so a child's own workers, such
as nginx's, go with it) when its block ends, however the block ends. The bench uses the
synchronous forms (its servers outlive each run's event loop), the soak and the memory tool the
asynchronous ones.
Must never: leave a child running after its block ends, wait without a deadline, or block an
event loop on a child (the asynchronous forms poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

POLL = 0.05  # seconds between two readiness checks
# Log lines a start-up failure shows: the whole start-up log, even a refused flag's reason
# followed by the usage text.
TAIL_LINES = 60
# Every variable the relay reads as configuration (flags' PYRYCODE_RELAY_<NAME>, the FCM key),
# and FLY_APP_NAME, which makes a relay outside cluster mode refuse to boot.
ENV_PREFIX = "PYRYCODE_RELAY_"
ENV_FLY_APP_NAME = "FLY_APP_NAME"


class SpawnError(RuntimeError):
    """A child exited before it was ready, or was not ready in time; the message ends with
    the tail of its log."""


def relay_command(*flags: str) -> list[str]:
    """Our relay with `flags`, run by this interpreter: the installation a tool runs from is
    the one it measures."""
    return [sys.executable, "-m", "pyrycode_relay", *flags]


def relay_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without what would configure a relay behind its flags'
    back (every PYRYCODE_RELAY_* variable, FLY_APP_NAME), then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.pop(ENV_FLY_APP_NAME, None)
    env.update(extra or {})
    return env


def listening(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:`port` (the relay logs nothing for a
    connection that closes before its request)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Child:
    """One started process and its log. `wait_ready*` and `stop*` poll; nothing else blocks."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, log: str) -> None:
        self.proc = proc
        self.name = name
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def logged(self, needle: str) -> bool:
        return any(needle in line for line in self.log_text().splitlines())

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "".join(f"\n  {line}" for line in self.log_text().splitlines()[-lines:])

    def _ready(self, ready: Callable[[], bool], what: str, timeout: float, end: float) -> bool:
        if self.proc.poll() is not None:
            raise SpawnError(f"{self.name} exited with {self.proc.returncode}{self.tail()}")
        if ready():
            return True
        if time.monotonic() > end:
            raise SpawnError(f"{self.name} did not {what} within {timeout:g} s{self.tail()}")
        return False

    def wait_ready(self, ready: Callable[[], bool], *, what: str, timeout: float) -> None:
        """Until `ready()`; SpawnError at once if the child exits, or after `timeout` s."""
        end = time.monotonic() + timeout
        while not self._ready(ready, what, timeout, end):
            time.sleep(POLL)

    async def wait_ready_async(
        self, ready: Callable[[], bool], *, what: str, timeout: float
    ) -> None:
        """`wait_ready` for a caller on an event loop."""
        end = time.monotonic() + timeout
        while not self._ready(ready, what, timeout, end):
            await asyncio.sleep(POLL)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, and SIGKILL if it has not exited after `grace` s (or on an interrupt)."""
        try:
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(grace)
        finally:
            self._kill()

    async def stop_async(self, grace: float = 10.0) -> None:
        """`stop` for a caller on an event loop."""
        try:
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                end = time.monotonic() + grace
                while self.proc.poll() is None and time.monotonic() < end:
                    await asyncio.sleep(POLL)
        finally:
            self._kill()

    def _signal_group(self, sig: int) -> None:
        """`sig` to the child's process group (it leads its own session), while the child
        is not yet reaped, so the group id cannot name anyone else."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()


def _start(
    argv: list[str], name: str, cpu: int | None, log: str, env: Mapping[str, str] | None
) -> Child:
    late_pin = False
    if cpu is not None:
        if shutil.which("taskset"):
            # taskset pins before exec, so every thread the child starts (Go's runtime
            # threads, redis-server's background threads) inherits the CPU; it then
            # execs, so the pid is the child's.
            argv = ["taskset", "-c", str(cpu), *argv]
        else:
            late_pin = True  # pins the main thread right after start: fine for Python
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
    child = Child(proc, name, log)
    if late_pin:
        assert cpu is not None
        try:
            os.sched_setaffinity(proc.pid, {cpu})
        except BaseException:
            child.stop()
            raise
    return child


@contextlib.contextmanager
def _log_file(log: str | None) -> Iterator[str]:
    """`log`, or a temporary file removed when the block ends."""
    if log is not None:
        yield log
        return
    fd, path = tempfile.mkstemp(prefix="pyrycode-tool-", suffix=".log")
    os.close(fd)
    try:
        yield path
    finally:
        os.unlink(path)


@contextlib.contextmanager
def spawned(
    argv: list[str],
    *,
    name: str,
    cpu: int | None = None,
    log: str | None = None,
    env: Mapping[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
    what: str = "become ready",
    timeout: float = 20.0,
    grace: float = 10.0,
) -> Iterator[Child]:
    """`argv` as a child in its own session (pinned to `cpu` when given, output to `log` or
    a temporary file, environment `env` or this process's), ready once `ready()` holds;
    stopped when the block ends."""
    with _log_file(log) as path:
        child = _start(argv, name, cpu, path, env)
        try:
            if ready is not None:
                child.wait_ready(ready, what=what, timeout=timeout)
            yield child
        finally:
            child.stop(grace)


@contextlib.asynccontextmanager
async def spawned_async(
    argv: list[str],
    *,
    name: str,
    cpu: int | None = None,
    log: str | None = None,
    env: Mapping[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
    what: str = "become ready",
    timeout: float = 20.0,
    grace: float = 10.0,
) -> AsyncIterator[Child]:
    """`spawned` for a caller on an event loop."""
    with _log_file(log) as path:
        child = _start(argv, name, cpu, path, env)
        try:
            if ready is not None:
                await child.wait_ready_async(ready, what=what, timeout=timeout)
            yield child
        finally:
            await child.stop_async(grace)


def relay(
    *flags: str,
    port: int,
    name: str = "relay",
    cpu: int | None = None,
    log: str | None = None,
    timeout: float = 20.0,
    grace: float = 10.0,
) -> contextlib.AbstractContextManager[Child]:
    """Our relay with `flags` (which must make it listen on 127.0.0.1:`port`) in the scrubbed
    environment, ready once `port` accepts connections: the listener is bound, whatever
    `--log-level` or `--log-format` the flags choose."""
    return spawned(
        relay_command(*flags),
        name=name,
        cpu=cpu,
        log=log,
        env=relay_env(),
        ready=lambda: listening(port),
        what="listen",
        timeout=timeout,
        grace=grace,
    )


def relay_async(
    *flags: str,
    port: int,
    name: str = "relay",
    log: str | None = None,
    timeout: float = 20.0,
    grace: float = 10.0,
) -> contextlib.AbstractAsyncContextManager[Child]:
    """`relay` for a caller on an event loop."""
    return spawned_async(
        relay_command(*flags),
        name=name,
        log=log,
        env=relay_env(),
        ready=lambda: listening(port),
        what="listen",
        timeout=timeout,
        grace=grace,
    )
