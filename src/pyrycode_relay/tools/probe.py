"""`pyrycode-relay probe URL`: an end-to-end check of a running relay (README §2).

Owns: acting as one binary and two phones against a relay over real WebSockets (ws:// or
wss://), checking the wire contract on the way (envelope shape and exact bytes both ways,
4404 for an unknown server-id, the close notice, `/healthz`), the report with latencies, and
the probe's exit codes (0 every check passed, 1 a check failed with a one-line reason,
2 bad usage).
Must never: import the relay's own serving code (it must judge the relay from outside, as a
real client would), print the device token it sends, or keep a connection open after it
returns. Every step is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection

from pyrycode_relay import __version__
from pyrycode_relay.core.duration import parse_duration

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_HEALTHZ_MAX_BYTES = 4096  # the relay's body is ~135 bytes; anything bigger is not a relay
_T = TypeVar("_T")


class ProbeFailed(Exception):
    """A check failed; `str()` is the one-line reason printed after `probe failed:`."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where to probe: `base` is the ws(s) URL without a trailing slash; endpoints append."""

    base: str
    secure: bool
    ssl_context: ssl.SSLContext | None

    def ws(self, endpoint: str) -> str:
        return f"{self.base}/v1/{endpoint}"

    def healthz(self) -> str:
        scheme, rest = self.base.split("://", 1)
        return ("https" if scheme == "wss" else "http") + "://" + rest + "/healthz"


@dataclass(slots=True)
class Report:
    url: str
    server_id: str
    steps: list[tuple[str, float]] = field(default_factory=list)
    relay_version: str = ""

    def render(self) -> str:
        lines = [f"probe {self.url} server-id={self.server_id}"]
        width = max((len(name) for name, _ in self.steps), default=0)
        lines += [f"  {name:<{width}}  {ms:8.2f} ms" for name, ms in self.steps]
        if self.relay_version:
            lines.append(f"  relay version {self.relay_version}")
        lines.append("ok")
        return "\n".join(lines)


def parse_target(url: str, ca_bundle: str | None) -> Target:
    """Validate the URL (ws/wss, or http/https as their aliases); raise ValueError."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError("URL must start with ws://, wss://, http:// or https://")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if parts.query or parts.fragment:
        raise ValueError("URL must not have a query or fragment")
    # A path is a prefix (a proxy that mounts the relay under /relay); /v1/... is appended.
    path = parts.path.rstrip("/")
    if path.endswith(("/v1/server", "/v1/client")):
        raise ValueError("give the relay's base URL, not an endpoint (drop /v1/...)")
    base = urlunsplit((scheme, parts.netloc, path, "", ""))
    context = None
    if scheme == "wss":
        try:
            context = ssl.create_default_context(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load --ca-bundle: {exc.__class__.__name__}") from None
    elif ca_bundle:
        raise ValueError("--ca-bundle applies to wss:// only")
    return Target(base, scheme == "wss", context)


def _connect_error(what: str, exc: BaseException) -> ProbeFailed:
    if isinstance(exc, websockets.InvalidStatus):
        return ProbeFailed(f"{what}: HTTP {exc.response.status_code} instead of 101")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ProbeFailed(f"{what}: TLS certificate not trusted ({exc.verify_message})")
    if isinstance(exc, OSError):
        detail = f": {exc.strerror}" if exc.strerror else ""
        return ProbeFailed(f"{what}: cannot connect ({exc.__class__.__name__}{detail})")
    return ProbeFailed(f"{what}: {exc.__class__.__name__}")


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
    `run()` raises ProbeFailed at the first check that fails."""

    def __init__(self, target: Target, url: str, step_timeout: float) -> None:
        self.target = target
        self.step_timeout = step_timeout
        self.server_id = str(uuid.uuid4())
        self.nonce = secrets.token_hex(8)
        self.report = Report(url, self.server_id)

    async def run(self) -> Report:
        binary_headers = {"X-Pyrycode-Server": self.server_id, "X-Pyrycode-Version": __version__}
        b = await self._dial("server", binary_headers, "binary connect")
        try:
            p = await self._dial("client", _phone_headers(self.server_id), "phone connect")
            try:
                conn_id = await self._phone_to_binary(b, p)
                await self._binary_to_phone(b, p, conn_id)
                await self._unknown_server_id()
                await self._close_notice(b, p, conn_id)
            finally:
                await self._close_quietly(p)
        finally:
            await self._close_quietly(b)
        start = time.perf_counter()
        self.report.relay_version = await self._bounded(
            "/healthz", asyncio.to_thread(_healthz, self.target, self.step_timeout)
        )
        self.report.steps.append(("/healthz", _ms(start)))
        return self.report

    async def _bounded(self, what: str, aw: Awaitable[_T]) -> _T:
        try:
            async with asyncio.timeout(self.step_timeout):
                return await aw
        except TimeoutError:
            raise ProbeFailed(f"{what}: no answer within {self.step_timeout:g}s") from None

    async def _dial(self, endpoint: str, headers: dict[str, str], step: str) -> ClientConnection:
        what = step.replace("connect", "upgrade")
        start = time.perf_counter()
        try:
            ws = await self._bounded(
                what,
                websockets.connect(
                    self.target.ws(endpoint),
                    additional_headers=headers,
                    user_agent_header=f"pyrycode-relay-probe/{__version__}",
                    compression=None,  # like the real clients (shared/spec/clients.md)
                    ssl=self.target.ssl_context,
                    open_timeout=None,  # bounded by _bounded, so the reason names the step
                    max_size=1 << 20,
                ),
            )
        except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise _connect_error(what, exc) from None
        self.report.steps.append((step, _ms(start)))
        return ws

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
        what = "phone -> binary"
        frame = _frame(self.nonce, "phone_to_binary")
        start = time.perf_counter()
        await self._bounded(what, p.send(frame))
        raw = await self._recv_text(b, what)
        self.report.steps.append((what, _ms(start)))
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
        what = "binary -> phone"
        frame = _frame(self.nonce, "binary_to_phone")
        start = time.perf_counter()
        await self._bounded(what, b.send(_envelope(conn_id, frame)))
        raw = await self._recv_text(p, what)
        self.report.steps.append((what, _ms(start)))
        if raw != frame:
            raise ProbeFailed(f"{what}: expected the inner frame only, got {raw[:200]!r}")

    async def _unknown_server_id(self) -> None:
        what = "unknown server-id"
        start = time.perf_counter()
        headers = _phone_headers(str(uuid.uuid4()))
        try:
            ws = await self._bounded(
                what,
                websockets.connect(
                    self.target.ws("client"),
                    additional_headers=headers,
                    user_agent_header=f"pyrycode-relay-probe/{__version__}",
                    compression=None,
                    ssl=self.target.ssl_context,
                    open_timeout=None,
                ),
            )
        except (OSError, websockets.InvalidHandshake) as exc:
            raise _connect_error(what, exc) from None
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
        self.report.steps.append(("unknown id -> 4404", _ms(start)))

    async def _close_notice(self, b: ClientConnection, p: ClientConnection, conn_id: str) -> None:
        # The phone leaves first, so the binary must be told (close notice, spec 152).
        what = "close notice"
        start = time.perf_counter()
        await self._bounded(what, p.close(1000))
        raw = await self._recv_text(b, what)
        want = {"conn_id": conn_id, "close_code": 1000}
        if _loads(raw, what) != want:
            raise ProbeFailed(f"{what}: expected {json.dumps(want)}, got {raw[:200]!r}")
        self.report.steps.append((what, _ms(start)))

    async def _close_quietly(self, ws: ClientConnection) -> None:
        try:
            async with asyncio.timeout(self.step_timeout):
                await ws.close()
        except (TimeoutError, OSError, websockets.WebSocketException):
            ws.transport.abort()


def _healthz(target: Target, timeout: float) -> str:
    """GET /healthz (blocking; run in a thread): the relay's version, or ProbeFailed."""
    request = urllib.request.Request(target.healthz(), headers={"User-Agent": "pyrycode-probe"})
    try:
        with urllib.request.urlopen(
            request, timeout=timeout, context=target.ssl_context
        ) as response:
            status = response.status
            body = response.read(_HEALTHZ_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ProbeFailed(f"/healthz: HTTP {exc.code} instead of 200") from None
    except (OSError, urllib.error.URLError) as exc:
        raise ProbeFailed(f"/healthz: {exc.__class__.__name__}") from None
    if status != 200 or len(body) > _HEALTHZ_MAX_BYTES:
        raise ProbeFailed(f"/healthz: HTTP {status} or an oversized body")
    try:
        doc = json.loads(body)
    except ValueError:
        raise ProbeFailed("/healthz: body is not JSON") from None
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        raise ProbeFailed('/healthz: body lacks "status":"ok"')
    return str(doc.get("version", ""))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrycode-relay probe",
        description=(
            "End-to-end check of a running relay: a binary and a phone on a random server-id "
            "round-trip a frame both ways; an unknown server-id must be closed 4404. "
            "Exit 0 ok, 1 a check failed (one-line reason), 2 bad usage."
        ),
    )
    parser.add_argument("url", help="relay base URL: ws://host:port or wss://host[:port][/prefix]")
    parser.add_argument("--ca-bundle", help="PEM file of CAs to trust for wss:// (default: system)")
    parser.add_argument(
        "--timeout", default="10s", help="bound for each step (Go duration or seconds; 10s)"
    )
    return parser


def _parse_timeout(text: str) -> float:
    try:
        timeout = parse_duration(text)
    except ValueError:
        raise ValueError("--timeout is not a duration (e.g. 10s, 500ms)") from None
    if timeout <= 0:
        raise ValueError("--timeout must be > 0")
    return timeout


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 for --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        timeout = _parse_timeout(args.timeout)
        target = parse_target(args.url, args.ca_bundle)
    except ValueError as exc:
        print(f"pyrycode-relay probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = asyncio.run(Probe(target, args.url, timeout).run())
    except ProbeFailed as exc:
        print(f"probe failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(report.render())
    return EXIT_OK
