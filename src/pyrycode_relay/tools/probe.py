"""`pyrycode-relay probe URL`: an end-to-end check of a running relay (README §2), once or
continuously like Tailscale's derpprobe (docs/operations.md § Check a deployment).

Owns: acting as one binary and two phones against a relay over real WebSockets (ws:// or
wss://, dialled at the URL's host or at `--connect-to`, with the URL's host as SNI and Host),
checking the wire contract on the way (envelope shape and exact bytes both ways, 4404 for an
unknown server-id, the close notice, `/healthz`), the per-step results and their two renderings
(the human report, one `--json` object per run), the continuous loop (`--interval`, ended by
SIGTERM/SIGINT) with its own Prometheus registry and loopback-only listener
(`--metrics-listen`), and the probe's exit codes (0 every check passed or a continuous run
ended by a signal, 1 a check failed with a one-line reason or the metrics listener could not
bind, 2 bad usage).
Must never: import the relay's own serving code (it must judge the relay from outside, as a
real client would), print the device token it sends, keep a connection open after a run
returns, use prometheus_client's global registry, or serve metrics on a non-loopback address.
Every step is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import re
import secrets
import signal
import ssl
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit
from wsgiref.simple_server import WSGIServer

import h11
import websockets
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from websockets.asyncio.client import ClientConnection
from websockets.headers import build_host

from pyrycode_relay import __version__
from pyrycode_relay.core.addresses import ListenAddress
from pyrycode_relay.core.duration import parse_duration

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG: Final = "pyrycode-relay probe"
JSON_SCHEMA: Final = 1  # bumped only when a consumer of --json would notice
_HEALTHZ_MAX_BYTES = 4096  # the relay's body is ~135 bytes; anything bigger is not a relay
_USER_AGENT: Final = f"pyrycode-relay-probe/{__version__}"
_T = TypeVar("_T")

# The steps of one run, in order: (id in --json and the metrics' `step` label, label in the
# human report, prefix of a failure's reason).
_STEPS: Final = (
    ("binary_connect", "binary connect", "binary upgrade"),
    ("phone_connect", "phone connect", "phone upgrade"),
    ("phone_to_binary", "phone -> binary", "phone -> binary"),
    ("binary_to_phone", "binary -> phone", "binary -> phone"),
    ("unknown_server_id", "unknown id -> 4404", "unknown server-id"),
    ("close_notice", "close notice", "close notice"),
    ("healthz", "/healthz", "/healthz"),
)
STEPS: Final = tuple(step for step, _, _ in _STEPS)
_LABEL: Final = {step: label for step, label, _ in _STEPS}
_WHAT: Final = {step: what for step, _, what in _STEPS}


class ProbeFailed(Exception):
    """A check failed; `str()` is the one-line reason printed after `probe failed:`."""


class UsageError(Exception):
    """Bad usage; `str()` is the one line printed before `; see --help`."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where to probe: `base` is the ws(s) URL without a trailing slash; endpoints append.
    `dial` is the `--connect-to` address, None to dial the URL's own host and port."""

    base: str
    secure: bool
    ssl_context: ssl.SSLContext | None
    dial: ListenAddress | None = None

    @property
    def _parts(self) -> tuple[str, int, str]:
        parts = urlsplit(self.base)
        assert parts.hostname is not None  # parse_target refused a URL without one
        return parts.hostname, parts.port or (443 if self.secure else 80), parts.path

    def ws(self, endpoint: str) -> str:
        return f"{self.base}/v1/{endpoint}"

    def address(self) -> tuple[str, int]:
        """The TCP address every connection of a run dials."""
        if self.dial is not None:
            return self.dial.host, self.dial.port
        host, port, _ = self._parts
        return host, port

    def server_name(self) -> str:
        """The URL's host: the SNI (wss://) and, with its port, the Host header."""
        return self._parts[0]

    def host_header(self) -> str:
        host, port, _ = self._parts
        return build_host(host, port, self.secure)  # as websockets builds the upgrade's Host

    def healthz_path(self) -> str:
        return self._parts[2] + "/healthz"


@dataclass(frozen=True, slots=True)
class StepResult:
    step: str  # one of STEPS
    ok: bool
    latency_ms: float  # until the step passed, or until it failed
    error: str | None  # the one-line reason, when not ok


@dataclass(slots=True)
class RunResult:
    """One run: the steps that ran, in order; a failed step is the last one."""

    url: str
    connect_to: str | None
    server_id: str
    started: float  # wall clock (time.time())
    steps: list[StepResult] = field(default_factory=list)
    relay_version: str | None = None
    error: str | None = None
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def render(self) -> str:
        """The human report of a run that passed."""
        lines = [f"probe {self.url} server-id={self.server_id}"]
        if self.connect_to is not None:
            lines[0] += f" connect-to={self.connect_to}"
        width = max((len(_LABEL[s.step]) for s in self.steps), default=0)
        lines += [f"  {_LABEL[s.step]:<{width}}  {s.latency_ms:8.2f} ms" for s in self.steps]
        if self.relay_version:
            lines.append(f"  relay version {self.relay_version}")
        lines.append("ok")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The `--json` object (schema in docs/operations.md § Check a deployment); one line."""
        started = dt.datetime.fromtimestamp(self.started, dt.UTC)
        doc: dict[str, Any] = {
            "schema": JSON_SCHEMA,
            "time": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "url": self.url,
            "connect_to": self.connect_to,
            "server_id": self.server_id,
            "ok": self.ok,
            "error": self.error,
            "duration_ms": round(self.duration_ms, 3),
            "relay_version": self.relay_version,
            "steps": [
                {
                    "name": s.step,
                    "ok": s.ok,
                    "latency_ms": round(s.latency_ms, 3),
                    "error": s.error,
                }
                for s in self.steps
            ],
        }
        return json.dumps(doc, ensure_ascii=False)


def parse_target(url: str, ca_bundle: str | None, connect_to: str | None = None) -> Target:
    """Validate the URL (ws/wss, or http/https as their aliases) and `--connect-to`; raise
    UsageError."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise UsageError("URL must start with ws://, wss://, http:// or https://")
    if not parts.hostname:
        raise UsageError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UsageError("URL must not carry a user or password")
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise UsageError("URL has a bad port") from None
    if parts.query or parts.fragment:
        raise UsageError("URL must not have a query or fragment")
    # A path is a prefix (a proxy that mounts the relay under /relay); /v1/... is appended.
    path = parts.path.rstrip("/")
    if path.endswith(("/v1/server", "/v1/client")):
        raise UsageError("give the relay's base URL, not an endpoint (drop /v1/...)")
    base = urlunsplit((scheme, parts.netloc, path, "", ""))
    context = None
    if scheme == "wss":
        try:
            context = ssl.create_default_context(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load --ca-bundle: {exc.__class__.__name__}") from None
    elif ca_bundle:
        raise UsageError("--ca-bundle applies to wss:// only")
    dial = None
    if connect_to is not None:
        # Go's host:port rules, as the relay's own listen flags; an empty host is no address.
        try:
            dial = ListenAddress.parse(connect_to)
        except ValueError:
            dial = None
        if dial is None or dial.host == "":
            raise UsageError("--connect-to must be HOST:PORT, e.g. 203.0.113.7:443 or [::1]:443")
    return Target(base, scheme == "wss", context, dial)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _connect_error(what: str, exc: BaseException, target: Target) -> ProbeFailed:
    if isinstance(exc, websockets.InvalidStatus):
        return ProbeFailed(f"{what}: HTTP {exc.response.status_code} instead of 101")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ProbeFailed(f"{what}: TLS certificate not trusted ({exc.verify_message})")
    hint = ""
    if target.secure and target.dial is None and _is_ip_literal(target.server_name()):
        # No SNI is sent to an IP literal, and a relay with --domain refuses such a handshake
        # (reset or alert): name the way to reach it by address.
        hint = "; a relay with --domain needs its name: wss://NAME with --connect-to IP:PORT"
    if isinstance(exc, ssl.SSLError):
        return ProbeFailed(f"{what}: TLS handshake failed ({exc.reason or 'SSLError'}){hint}")
    if isinstance(exc, OSError):
        detail = f": {exc.strerror}" if exc.strerror else ""
        return ProbeFailed(f"{what}: cannot connect ({exc.__class__.__name__}{detail}){hint}")
    return ProbeFailed(f"{what}: {exc.__class__.__name__}{hint}")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _phone_headers(server_id: str) -> dict[str, str]:
    # The token is required non-empty; the relay never reads it. A fresh random one per run.
    return {
        "X-Pyrycode-Server": server_id,
        "X-Pyrycode-Token": secrets.token_hex(16),
        "X-Pyrycode-Device-Name": "pyrycode-relay probe",
    }


def _envelope(conn_id: str, frame: str) -> str:
    """`{"conn_id":…,"frame":<frame>}` with the frame embedded verbatim (reference §3.3)."""
    return '{"conn_id":' + json.dumps(conn_id) + ',"frame":' + frame + "}"


def _loads(raw: str, what: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        raise ProbeFailed(f"{what}: not JSON: {raw[:200]!r}") from None


def _frame(nonce: str, direction: str) -> str:
    # Compact ASCII JSON without <>&: the reference relay (Go) re-encodes a phone's frame
    # compactly, ours copies it verbatim; for this frame both give exactly the same bytes.
    return json.dumps({"probe": nonce, "dir": direction}, separators=(",", ":"))


class Probe:
    """One run against one relay: every check in order, each bounded by `step_timeout`;
    `run()` stops at the first check that fails and returns what ran (it raises only when
    cancelled)."""

    def __init__(
        self, target: Target, url: str, step_timeout: float, connect_to: str | None = None
    ) -> None:
        self.target = target
        self.step_timeout = step_timeout
        self.server_id = str(uuid.uuid4())
        self.nonce = secrets.token_hex(8)
        self.result = RunResult(url, connect_to, self.server_id, time.time())

    async def run(self) -> RunResult:
        start = time.perf_counter()
        try:
            await self._checks()
        except ProbeFailed as exc:
            self.result.error = str(exc)
        self.result.duration_ms = _ms(start)
        return self.result

    async def _checks(self) -> None:
        binary_headers = {"X-Pyrycode-Server": self.server_id, "X-Pyrycode-Version": __version__}
        async with self._step("binary_connect"):
            b = await self._connect("server", binary_headers, _WHAT["binary_connect"])
        try:
            async with self._step("phone_connect"):
                phone_headers = _phone_headers(self.server_id)
                p = await self._connect("client", phone_headers, _WHAT["phone_connect"])
            try:
                async with self._step("phone_to_binary"):
                    conn_id = await self._phone_to_binary(b, p)
                async with self._step("binary_to_phone"):
                    await self._binary_to_phone(b, p, conn_id)
                async with self._step("unknown_server_id"):
                    await self._unknown_server_id()
                async with self._step("close_notice"):
                    await self._close_notice(b, p, conn_id)
            finally:
                await self._close_quietly(p)
        finally:
            await self._close_quietly(b)
        async with self._step("healthz"):
            self.result.relay_version = await self._bounded("/healthz", self._healthz())

    @contextlib.asynccontextmanager
    async def _step(self, step: str) -> AsyncIterator[None]:
        """Time the block and record it as `step`; a failure ends the run with its reason."""
        start = time.perf_counter()
        try:
            yield
        except ProbeFailed as exc:
            self.result.steps.append(StepResult(step, False, _ms(start), str(exc)))
            raise
        except (OSError, websockets.WebSocketException) as exc:
            # A send on a connection the relay dropped, and the like: a check failure too,
            # never the end of a continuous probe.
            failed = ProbeFailed(f"{_WHAT[step]}: {exc.__class__.__name__}")
            self.result.steps.append(StepResult(step, False, _ms(start), str(failed)))
            raise failed from None
        self.result.steps.append(StepResult(step, True, _ms(start), None))

    async def _bounded(self, what: str, aw: Awaitable[_T]) -> _T:
        try:
            async with asyncio.timeout(self.step_timeout):
                return await aw
        except TimeoutError:
            raise ProbeFailed(f"{what}: no answer within {self.step_timeout:g}s") from None

    async def _connect(
        self, endpoint: str, headers: dict[str, str], what: str, max_size: int | None = 1 << 20
    ) -> ClientConnection:
        target = self.target
        dial: dict[str, Any] = {}
        if target.dial is not None:
            # Dial there; SNI and Host stay the URL's (websockets takes both from the URI).
            dial = {"host": target.dial.host, "port": target.dial.port}
        try:
            return await self._bounded(
                what,
                websockets.connect(
                    target.ws(endpoint),
                    additional_headers=headers,
                    user_agent_header=_USER_AGENT,
                    compression=None,  # like the real clients (shared/spec/clients.md)
                    ssl=target.ssl_context,
                    open_timeout=None,  # bounded by _bounded, so the reason names the step
                    max_size=max_size,
                    # The probe judges the relay, not a proxy between: it never reads
                    # HTTP(S)_PROXY (the /healthz check does not either).
                    proxy=None,
                    **dial,
                ),
            )
        except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise _connect_error(what, exc, target) from None

    async def _recv_text(self, ws: ClientConnection, what: str) -> str:
        try:
            msg = await self._bounded(what, ws.recv())
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else "none"
            raise ProbeFailed(f"{what}: connection closed (close code {code})") from None
        if not isinstance(msg, str):
            raise ProbeFailed(f"{what}: got a binary frame; the relay must send text frames")
        return msg

    async def _phone_to_binary(self, b: ClientConnection, p: ClientConnection) -> str:
        what = _WHAT["phone_to_binary"]
        frame = _frame(self.nonce, "phone_to_binary")
        await self._bounded(what, p.send(frame))
        raw = await self._recv_text(b, what)
        env = _loads(raw, what)
        if not isinstance(env, dict) or list(env) != ["conn_id", "frame"]:
            raise ProbeFailed(f"{what}: not a conn_id/frame envelope: {raw[:200]!r}")
        conn_id = env["conn_id"]
        pattern = re.escape(f"client-{self.server_id}-") + "[0-9a-f]{8}"
        if not isinstance(conn_id, str) or re.fullmatch(pattern, conn_id) is None:
            raise ProbeFailed(f"{what}: conn_id {conn_id!r} is not client-<server-id>-<hex8>")
        if raw != _envelope(conn_id, frame):
            raise ProbeFailed(f"{what}: envelope bytes differ: {raw[:200]!r}")
        return conn_id

    async def _binary_to_phone(
        self, b: ClientConnection, p: ClientConnection, conn_id: str
    ) -> None:
        what = _WHAT["binary_to_phone"]
        frame = _frame(self.nonce, "binary_to_phone")
        await self._bounded(what, b.send(_envelope(conn_id, frame)))
        raw = await self._recv_text(p, what)
        if raw != frame:
            raise ProbeFailed(f"{what}: expected the inner frame only, got {raw[:200]!r}")

    async def _unknown_server_id(self) -> None:
        what = _WHAT["unknown_server_id"]
        ws = await self._connect("client", _phone_headers(str(uuid.uuid4())), what, None)
        try:
            try:
                msg = await self._bounded(what, ws.recv())
            except websockets.ConnectionClosed as exc:
                if exc.rcvd is None:
                    raise ProbeFailed(f"{what}: closed without a close frame") from None
                code, reason = exc.rcvd.code, exc.rcvd.reason
                if (code, reason) != (4404, "no server with that id"):
                    raise ProbeFailed(
                        f"{what}: expected close 4404 'no server with that id', "
                        f"got {code} {reason!r}"
                    ) from None
            else:
                raise ProbeFailed(f"{what}: expected close 4404, got a message {msg!r:.200}")
        finally:
            await self._close_quietly(ws)

    async def _close_notice(self, b: ClientConnection, p: ClientConnection, conn_id: str) -> None:
        # The phone leaves first, so the binary must be told (close notice, spec 152).
        what = _WHAT["close_notice"]
        await self._bounded(what, p.close(1000))
        raw = await self._recv_text(b, what)
        want = {"conn_id": conn_id, "close_code": 1000}
        if _loads(raw, what) != want:
            raise ProbeFailed(f"{what}: expected {json.dumps(want)}, got {raw[:200]!r}")

    async def _close_quietly(self, ws: ClientConnection) -> None:
        try:
            async with asyncio.timeout(self.step_timeout):
                await ws.close()
        except (TimeoutError, OSError, websockets.WebSocketException):
            ws.transport.abort()

    async def _healthz(self) -> str:
        """GET /healthz on the same address, SNI and Host as the WebSockets: the relay's
        version, or ProbeFailed."""
        target, what = self.target, _WHAT["healthz"]
        host, port = target.address()
        secure = target.ssl_context is not None
        try:
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=target.ssl_context,
                server_hostname=target.server_name() if secure else None,
            )
        except OSError as exc:
            raise _connect_error(what, exc, target) from None
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [
                ("Host", target.host_header()),
                ("User-Agent", _USER_AGENT),
                ("Connection", "close"),
            ]
            request = h11.Request(method="GET", target=target.healthz_path(), headers=headers)
            for event in (request, h11.EndOfMessage()):
                writer.write(conn.send(event) or b"")
            status, body = await _read_response(conn, reader, what)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self.step_timeout):
                    await writer.wait_closed()
        if status != 200:
            raise ProbeFailed(f"{what}: HTTP {status} instead of 200")
        try:
            doc = json.loads(body)
        except ValueError:
            raise ProbeFailed(f"{what}: body is not JSON") from None
        if not isinstance(doc, dict) or doc.get("status") != "ok":
            raise ProbeFailed(f'{what}: body lacks "status":"ok"')
        return str(doc.get("version", ""))


async def _read_response(
    conn: h11.Connection, reader: asyncio.StreamReader, what: str
) -> tuple[int, bytes]:
    """(status, body) of the one response on `conn`; the body is capped."""
    status, body = 0, b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            raise ProbeFailed(f"{what}: not an HTTP/1.1 response") from None
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await reader.read(_HEALTHZ_MAX_BYTES))
            except OSError as exc:
                raise ProbeFailed(f"{what}: {exc.__class__.__name__}") from None
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _HEALTHZ_MAX_BYTES:
                raise ProbeFailed(f"{what}: oversized body")
        elif isinstance(event, h11.EndOfMessage):
            return status, body
        elif isinstance(event, h11.ConnectionClosed):
            raise ProbeFailed(f"{what}: connection closed before the response ended")


class ProbeMetrics:
    """The continuous probe's series, in a registry of its own (never prometheus_client's
    global one, so no process or GC collectors). Names in docs/operations.md."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step_seconds = Histogram(
            "pyrycode_relay_probe_step_duration_seconds",
            "Latency of each probe step that passed.",
            ["step"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.step_runs = Counter(
            "pyrycode_relay_probe_step_runs",
            "Probe steps run, by step and result (ok, fail); a step after a failed one is not run.",
            ["step", "result"],
            registry=r,
        )
        self.step_success = Gauge(
            "pyrycode_relay_probe_step_success",
            "1 if the step passed in the last run, 0 if it failed or was not reached.",
            ["step"],
            registry=r,
        )
        self.runs = Counter(
            "pyrycode_relay_probe_runs", "Probe runs, by result (ok, fail).", ["result"], registry=r
        )
        self.success = Gauge(
            "pyrycode_relay_probe_success", "1 if the last run passed every step.", registry=r
        )
        self.last_run = Gauge(
            "pyrycode_relay_probe_last_run_timestamp_seconds",
            "Unix time at which the last run ended.",
            registry=r,
        )
        # Every series exists, at 0, from the first scrape: rate() and absence alerts see a
        # step that has never failed as 0, not as missing.
        for step in STEPS:
            self.step_seconds.labels(step)
            for result in ("ok", "fail"):
                self.step_runs.labels(step, result)
        for result in ("ok", "fail"):
            self.runs.labels(result)

    def record(self, run: RunResult) -> None:
        passed = {s.step for s in run.steps if s.ok}
        for s in run.steps:
            self.step_runs.labels(s.step, "ok" if s.ok else "fail").inc()
            if s.ok:
                self.step_seconds.labels(s.step).observe(s.latency_ms / 1000.0)
        for step in STEPS:
            self.step_success.labels(step).set(1 if step in passed else 0)
        self.runs.labels("ok" if run.ok else "fail").inc()
        self.success.set(1 if run.ok else 0)
        self.last_run.set(time.time())


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    target: Target
    timeout: float
    connect_to: str | None
    json: bool
    interval: float | None  # None: one run
    metrics_listen: ListenAddress | None


def _report(run: RunResult, as_json: bool) -> None:
    """A run's output: one JSON line on stdout, or the report (stdout) / reason (stderr).
    Flushed, so a service's log or a pipe sees each run when it ends."""
    if as_json:
        print(run.to_json(), flush=True)
    elif run.ok:
        print(run.render(), flush=True)
    else:
        print(f"probe failed: {run.error}", file=sys.stderr, flush=True)


def _probe(opts: Options) -> Probe:
    return Probe(opts.target, opts.url, opts.timeout, opts.connect_to)


async def _run_once(opts: Options) -> int:
    run = await _probe(opts).run()
    _report(run, opts.json)
    return EXIT_OK if run.ok else EXIT_FAILED


async def _run_forever(opts: Options, interval: float) -> int:
    """Run every `interval` (from one start to the next; a run longer than that is followed
    at once, without catching up) until SIGTERM or SIGINT; a signal cancels a run in
    progress, which is then not reported. The signal handlers are in place before the
    metrics listener binds, so a supervisor that sees the listener can stop the probe
    cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    server = None
    try:
        metrics = None
        if opts.metrics_listen is not None:
            metrics = ProbeMetrics()
            try:
                server, _ = _serve_metrics(metrics, opts.metrics_listen)
            except OSError as exc:
                reason = exc.strerror or exc.__class__.__name__
                print(
                    f"{PROG}: cannot listen on --metrics-listen {opts.metrics_listen}: {reason}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
        next_start = loop.time()
        while not stop.is_set():
            run = asyncio.create_task(_probe(opts).run())
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait((run, stopped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopped
            if not run.done():
                run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run  # its connections are closed, each bounded by --timeout
                break
            result = run.result()
            _report(result, opts.json)
            if metrics is not None:
                metrics.record(result)
            next_start = max(next_start + interval, loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_start):
                    await stop.wait()
    finally:
        if server is not None:
            # shutdown() waits for serve_forever's poll (0.5 s): not on the event loop.
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "End-to-end check of a running relay: a binary and a phone on a random server-id "
            "round-trip a frame both ways; an unknown server-id must be closed 4404; the close "
            "notice and /healthz are checked. Once by default; with --interval, continuously "
            "(like derpprobe) until SIGTERM/SIGINT, optionally serving Prometheus metrics. "
            "Exit 0 ok (or stopped by a signal), 1 a check failed (one-line reason), "
            "2 bad usage."
        ),
    )
    parser.add_argument("url", help="relay base URL: ws://host:port or wss://host[:port][/prefix]")
    parser.add_argument("--ca-bundle", help="PEM file of CAs to trust for wss:// (default: system)")
    parser.add_argument(
        "--timeout", default="10s", help="bound for each step (Go duration or seconds; 10s)"
    )
    parser.add_argument(
        "--connect-to",
        metavar="HOST:PORT",
        help="dial this address instead of the URL's host and port; the URL's host is still "
        "sent as TLS SNI and HTTP Host (like curl --connect-to), e.g. to probe one instance "
        "behind DNS or a relay with --domain by IP",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per run on stdout (schema in docs/operations.md)",
    )
    parser.add_argument(
        "--interval",
        metavar="DURATION",
        help="probe continuously, one run every DURATION (e.g. 30s), until SIGTERM/SIGINT",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="with --interval: serve Prometheus metrics on this loopback address, "
        "e.g. 127.0.0.1:9110 (default: none)",
    )
    return parser


def _positive_duration(flag: str, text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError:
        raise UsageError(f"{flag} is not a duration (e.g. 10s, 500ms)") from None
    if value <= 0:
        raise UsageError(f"{flag} must be > 0")
    return value


def _options(argv: Sequence[str]) -> Options:
    args = _parser().parse_args(list(argv))
    timeout = _positive_duration("--timeout", args.timeout)
    interval = None if args.interval is None else _positive_duration("--interval", args.interval)
    target = parse_target(args.url, args.ca_bundle, args.connect_to)
    metrics_listen = None
    if args.metrics_listen is not None:
        if interval is None:
            raise UsageError("--metrics-listen needs --interval")
        # The relay's own --metrics-listen rule: a loopback IP literal, never a name.
        try:
            metrics_listen = ListenAddress.parse(args.metrics_listen)
        except ValueError:
            metrics_listen = None
        if metrics_listen is None or not metrics_listen.is_loopback_literal:
            raise UsageError(
                "--metrics-listen must be a loopback IP literal and port, "
                "e.g. 127.0.0.1:9110 or [::1]:9110"
            )
    return Options(args.url, target, timeout, args.connect_to, args.json, interval, metrics_listen)


def _serve_metrics(
    metrics: ProbeMetrics, addr: ListenAddress
) -> tuple[WSGIServer, threading.Thread]:
    """prometheus_client's HTTP server (a daemon thread) for the probe's own registry."""
    return start_http_server(addr.port, addr.host, registry=metrics.registry)


def main(argv: Sequence[str]) -> int:
    try:
        opts = _options(argv)
    except SystemExit as exc:  # --help: argparse printed it on stdout
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        print(f"{PROG}: {exc}; see --help", file=sys.stderr)
        return EXIT_USAGE
    if opts.interval is None:
        return asyncio.run(_run_once(opts))
    if opts.metrics_listen is not None:
        # No `_created` series: a scrape stays the size of what it says, as the relay's does.
        # (prometheus_client's switch is process-wide; this process is only the probe.)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
    return asyncio.run(_run_forever(opts, opts.interval))
