"""Command-line and environment flag parsing into an immutable `Config`.

Owns: the flag table (names, types, defaults, help), the value syntaxes (Go-style durations,
byte sizes, Go `strconv.ParseBool` booleans), the `PYRYCODE_RELAY_<FLAG>` environment fallback,
and generic per-flag range checks. Must never: touch the filesystem, network or process state,
read `os.environ` itself, or decide deployment policy (the boot-time refusals live in
`ops.boot`). It must never echo a value that came from the environment in an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pyrycode_relay.core.duration import DurationError, format_duration, parse_duration

ENV_PREFIX: Final = "PYRYCODE_RELAY_"

_INT64_MAX: Final = (1 << 63) - 1
_NS_PER_S: Final = 1_000_000_000

_Kind = Literal["str", "bool", "int", "duration", "size"]
# Generic range rules; anything deployment-specific (e.g. --max-connections > 0) is boot's job.
_Check = Literal["none", "positive", "at_least_1", "non_negative"]


class ConfigError(Exception):
    """A flag or flag value was refused. `str()` is one line naming the flag and the problem."""


class HelpRequested(ConfigError):
    """`-h`/`--help` was given: the CLI prints the help and exits 0 (as the reference does)."""

    def __init__(self) -> None:
        super().__init__("help requested")


@dataclass(frozen=True, slots=True)
class Config:
    domain: str
    cert_cache: str
    insecure_listen: str
    https_listen: str
    http_listen: str
    metrics_listen: str
    trust_x_forwarded_for: bool
    https_proxy_protocol: bool
    max_connections: int
    version: bool
    check_config: bool
    grace_period: float
    heartbeat_interval: float
    heartbeat_timeout: float
    conflict_probe_timeout: float
    max_phones_per_server: int
    max_message_bytes: int
    message_read_timeout: float
    write_timeout: float
    handshake_timeout: float
    phone_outbox_bytes: int
    rate_limit_burst: int
    rate_limit_interval: float
    drain_timeout: float
    push_burst: int
    push_interval: float
    push_max_in_flight: int
    max_buffered_bytes: int
    max_connections_per_ip: int
    proxy_protocol_allow: str
    tls_cert: str
    tls_key: str
    acme_directory: str
    acme_email: str
    acme_ca_bundle: str
    fcm_endpoint: str
    log_format: str
    log_level: str
    cluster_redis: str
    instance_id: str
    cluster_lease: float
    handover_timeout: float
    handover_test: str
    # Flag names ("http-listen") given on the command line or via the environment; boot needs
    # this because "explicitly given" matters even when the value equals the default.
    explicit: frozenset[str]

    @property
    def mode(self) -> str:
        """`insecure`, `static-tls` or `autocert`: what the flags select (the boot checks
        refuse a configuration that selects none or two)."""
        if self.insecure_listen:
            return "insecure"
        return "static-tls" if self.tls_cert else "autocert"


@dataclass(frozen=True, slots=True)
class _Flag:
    name: str
    kind: _Kind
    default: str | bool | int | float
    help: str
    check: _Check = "none"
    choices: tuple[str, ...] = ()
    env: bool = True

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.replace("-", "_").upper()


_KIB: Final = 1024
_MIB: Final = 1024 * _KIB
_GIB: Final = 1024 * _MIB

# Sentinel for the one default that depends on the environment ($HOME).
_CERT_CACHE_DEFAULT: Final = "$HOME/.pyrycode-relay/certs"

_FLAGS: Final[tuple[_Flag, ...]] = (
    _Flag("domain", "str", "", "public domain for Let's Encrypt; selects autocert mode"),
    _Flag("cert-cache", "str", _CERT_CACHE_DEFAULT, "autocert certificate cache directory"),
    _Flag("insecure-listen", "str", "", "plain-HTTP listen address (e.g. :8080); insecure mode"),
    _Flag("https-listen", "str", ":443", "TLS listen address (autocert / --tls-cert mode)"),
    _Flag("http-listen", "str", ":80", "ACME HTTP-01 listen address"),
    _Flag("metrics-listen", "str", "127.0.0.1:9090", "loopback /metrics address; empty disables"),
    _Flag("trust-x-forwarded-for", "bool", False, "key the rate limiter on X-Forwarded-For"),
    _Flag("https-proxy-protocol", "bool", False, "require a PROXY v2 header on --https-listen"),
    _Flag("max-connections", "int", 1000, "global live-WebSocket cap (over it: HTTP 503)"),
    _Flag("version", "bool", False, "print the version and exit", env=False),
    _Flag(
        "check-config",
        "bool",
        False,
        "check the configuration, print the plan and exit (binds nothing)",
        env=False,
    ),
    _Flag("grace-period", "duration", 30.0, "how long a vanished binary's phones wait"),
    _Flag("heartbeat-interval", "duration", 30.0, "ping interval", "positive"),
    _Flag("heartbeat-timeout", "duration", 30.0, "pong wait before closing", "positive"),
    _Flag("conflict-probe-timeout", "duration", 10.0, "incumbent probe on claim", "positive"),
    _Flag("max-phones-per-server", "int", 16, "phones per server-id (4429)", "at_least_1"),
    _Flag("max-message-bytes", "size", 262144, "largest accepted message", "at_least_1"),
    _Flag("message-read-timeout", "duration", 30.0, "time to receive one message", "positive"),
    _Flag("write-timeout", "duration", 10.0, "time to write one frame", "positive"),
    _Flag("handshake-timeout", "duration", 5.0, "header/PROXY/TLS handshake time", "positive"),
    _Flag("phone-outbox-bytes", "size", 4 * _MIB, "per-phone delivery queue", "at_least_1"),
    _Flag("rate-limit-burst", "int", 20, "per-IP upgrade burst; 0 disables", "non_negative"),
    _Flag("rate-limit-interval", "duration", 6.0, "one rate-limit token per interval", "positive"),
    _Flag("drain-timeout", "duration", 10.0, "shutdown drain deadline", "positive"),
    _Flag("push-burst", "int", 6, "push wakes per server-id per interval", "at_least_1"),
    _Flag("push-interval", "duration", 10.0, "push wake refill interval", "positive"),
    _Flag("push-max-in-flight", "int", 32, "concurrent FCM sends", "at_least_1"),
    _Flag("max-buffered-bytes", "size", 64 * _MIB, "budget for all phone outboxes", "at_least_1"),
    _Flag("max-connections-per-ip", "int", 0, "live WebSockets per IP; 0 = off", "non_negative"),
    _Flag("proxy-protocol-allow", "str", "", "CIDRs allowed to send PROXY headers; empty = any"),
    _Flag("tls-cert", "str", "", "PEM certificate file (instead of ACME)"),
    _Flag("tls-key", "str", "", "PEM private key file (instead of ACME)"),
    _Flag(
        "acme-directory",
        "str",
        "https://acme-v02.api.letsencrypt.org/directory",
        "ACME directory URL",
    ),
    _Flag("acme-email", "str", "", "ACME account contact address"),
    _Flag("acme-ca-bundle", "str", "", "CA file for the ACME directory; empty = system"),
    _Flag("fcm-endpoint", "str", "https://fcm.googleapis.com", "FCM HTTP v1 base URL"),
    _Flag("log-format", "str", "text", "text or json", choices=("text", "json")),
    _Flag(
        "log-level",
        "str",
        "info",
        "debug, info, warn or error",
        choices=("debug", "info", "warn", "error"),
    ),
    _Flag("cluster-redis", "str", "", "Redis URL; enables cluster mode"),
    _Flag("instance-id", "str", "", "instance name in cluster mode; empty = random"),
    _Flag("cluster-lease", "duration", 10.0, "ownership lease in cluster mode", "positive"),
    _Flag(
        "handover-timeout",
        "duration",
        10.0,
        "SIGUSR2: time for the successor to start, and again to take over",
        "positive",
    ),
    _Flag(
        "handover-test",
        "str",
        "",
        "tests only: how a successor fails (fail-start, no-ack, format=N)",
        env=False,
    ),
)

_BY_NAME: Final[dict[str, _Flag]] = {f.name: f for f in _FLAGS}

# --- value syntaxes --------------------------------------------------------------------------

_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})

_SIZE: Final = re.compile(r"([0-9]+)(KiB|MiB|GiB)?")
_SIZE_UNITS: Final[dict[str, int]] = {"": 1, "KiB": _KIB, "MiB": _MIB, "GiB": _GIB}
_INT: Final = re.compile(r"[+-]?[0-9]+")


class _BadValue(Exception):
    """A value failed to parse; the message is the problem, without the value."""


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _BadValue("not a boolean (want true/false/1/0/t/f)")


def parse_size(text: str) -> int:
    """Parse bytes: a bare integer or an integer with a `KiB`/`MiB`/`GiB` suffix."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise _BadValue("not a size (want bytes or a KiB/MiB/GiB suffix)")
    value = int(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
    if value > _INT64_MAX:
        raise _BadValue("size out of range")
    return value


def format_size(value: int) -> str:
    for suffix, scale in (("GiB", _GIB), ("MiB", _MIB), ("KiB", _KIB)):
        if value and value % scale == 0:
            return f"{value // scale}{suffix}"
    return str(value)


def _parse_int(text: str) -> int:
    # Explicit regex: Python's int() would also accept "1_000" and surrounding whitespace.
    if _INT.fullmatch(text) is None:
        raise _BadValue("not an integer")
    value = int(text)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise _BadValue("integer out of range")
    return value


def _convert(flag: _Flag, raw: str) -> str | bool | int | float:
    if flag.kind == "str":
        return raw
    if flag.kind == "bool":
        return parse_bool(raw)
    if flag.kind == "int":
        return _parse_int(raw)
    if flag.kind == "duration":
        try:
            return parse_duration(raw)
        except DurationError as exc:
            raise _BadValue(str(exc)) from None
    return parse_size(raw)


def _range_problem(flag: _Flag, value: str | bool | int | float) -> str | None:
    if flag.choices and value not in flag.choices:
        return "must be one of " + ", ".join(flag.choices)
    if isinstance(value, bool | str):
        return None
    if flag.check == "positive" and value <= 0:
        return "must be > 0"
    if flag.check == "at_least_1" and value < 1:
        return "must be >= 1"
    if flag.check == "non_negative" and value < 0:
        return "must be >= 0"
    return None


# --- parsing ---------------------------------------------------------------------------------


def _quote(text: str) -> str:
    # Go-%q-like quoting that also guarantees the message stays on one line.
    return json.dumps(text, ensure_ascii=False)


@dataclass(slots=True)
class _Source:
    raw: str
    from_env: bool


def _error(flag: _Flag, source: _Source, problem: str) -> ConfigError:
    if source.from_env:
        # Environment values are never echoed (they may be secrets pasted in the wrong place).
        return ConfigError(
            f"invalid value for flag --{flag.name} from {flag.env_var} (value withheld): {problem}"
        )
    return ConfigError(f"invalid value {_quote(source.raw)} for flag --{flag.name}: {problem}")


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Parse argv (without the program name) with `environ` as fallback; raise ConfigError."""
    values: dict[str, str | bool | int | float] = {}
    sources: dict[str, _Source] = {}

    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        # Like Go's flag package: the first non-flag argument ends flag parsing.
        if len(arg) < 2 or arg[0] != "-":
            break
        i += 1
        if arg == "--":
            break
        name = arg[2:] if arg[1] == "-" else arg[1:]
        if not name or name[0] in "-=":
            raise ConfigError(f"bad flag syntax: {arg}")
        name, sep, value = name.partition("=")
        flag = _BY_NAME.get(name)
        if flag is None:
            if name in ("h", "help"):
                raise HelpRequested
            # Named as typed (`--bogus`, `-bogus`), never with its value.
            raise ConfigError(f"flag provided but not defined: {arg.partition('=')[0]}")
        if flag.kind == "bool":
            # A boolean never consumes the next argument.
            raw = value if sep else "true"
        elif sep:
            raw = value
        elif i < len(args):
            # Go takes the next argument verbatim, even if it starts with "-".
            raw = args[i]
            i += 1
        else:
            raise ConfigError(f"flag needs an argument: --{flag.name}")
        source = _Source(raw, from_env=False)
        try:
            values[flag.name] = _convert(flag, raw)
        except _BadValue as exc:
            raise _error(flag, source, str(exc)) from None
        sources[flag.name] = source

    if i < len(args):
        raise ConfigError(f"unexpected argument {_quote(args[i])}")

    for flag in _FLAGS:
        if flag.name in values or not flag.env:
            continue
        raw_env = environ.get(flag.env_var)
        if raw_env is None:
            continue
        # Empty means "set to empty" for strings (e.g. disable metrics) but "unset" otherwise.
        if raw_env == "" and flag.kind != "str":
            continue
        source = _Source(raw_env, from_env=True)
        try:
            values[flag.name] = _convert(flag, raw_env)
        except _BadValue as exc:
            raise _error(flag, source, str(exc)) from None
        sources[flag.name] = source

    for flag in _FLAGS:
        if flag.name in sources:
            problem = _range_problem(flag, values[flag.name])
            if problem is not None:
                raise _error(flag, sources[flag.name], problem)

    fields: dict[str, Any] = {}
    for flag in _FLAGS:
        if flag.name in values:
            fields[flag.field] = values[flag.name]
        elif flag.name == "cert-cache":
            fields[flag.field] = default_cert_cache(environ)
        else:
            fields[flag.field] = flag.default
    return Config(**fields, explicit=frozenset(sources))


def default_cert_cache(environ: Mapping[str, str]) -> str:
    """The reference's default: `$HOME/.pyrycode-relay/certs`, relative without a home."""
    home = environ.get("HOME", "")
    if home:
        return home + "/.pyrycode-relay/certs"
    return ".pyrycode-relay/certs"


def env_var_for(flag_name: str) -> str:
    """`max-connections` -> `PYRYCODE_RELAY_MAX_CONNECTIONS`."""
    return _BY_NAME[flag_name].env_var


def flag_names() -> tuple[str, ...]:
    return tuple(f.name for f in _FLAGS)


def _default_text(flag: _Flag) -> str:
    if flag.kind == "duration":
        assert isinstance(flag.default, float)
        return format_duration(flag.default)
    if flag.kind == "size":
        assert isinstance(flag.default, int)
        return format_size(flag.default)
    if flag.kind == "str":
        return _quote(str(flag.default))
    return str(flag.default).lower()


def usage() -> str:
    """The flags part of `--help`: one line per flag with its type, one-line help and default."""
    names = [f"--{f.name}" for f in _FLAGS if not f.env]
    command_line_only = " and ".join([", ".join(names[:-1]), names[-1]] if names[1:] else names)
    lines = [
        f"Every flag except {command_line_only} may also be set as",
        f"{ENV_PREFIX}<FLAG_IN_UPPER_SNAKE>; the command line wins. Durations: 30s, 250ms,",
        "1m30s or bare seconds. Sizes: bytes, KiB, MiB or GiB.",
        "",
    ]
    width = max(len(f.name) + len(f.kind) for f in _FLAGS) + 4
    for flag in _FLAGS:
        head = f"--{flag.name} {flag.kind}"
        lines.append(f"  {head:<{width}} {flag.help} (default {_default_text(flag)})")
    return "\n".join(lines) + "\n"


def log_format_hint(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The --log-format a command line asks for, read leniently: a refused command line is
    still reported in the format the operator chose. `text` when absent or not understood."""
    chosen = environ.get(_BY_NAME["log-format"].env_var, "")
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, sep, value = arg.lstrip("-").partition("=")
        if name != "log-format" or not arg.startswith("-"):
            continue
        if sep:
            chosen = value
        elif i + 1 < len(args):
            chosen = args[i + 1]
    return chosen if chosen in _BY_NAME["log-format"].choices else "text"
