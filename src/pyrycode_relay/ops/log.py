"""Structured log lines in the shape of Go's `log/slog` text and JSON handlers.

Owns: the line format (`time=… level=… msg=… key=value`), the key allowlist and Go-compatible
quoting. Must never: accept a key outside `ALLOWED_KEYS` (that would be a way to log secrets),
raise because the stream failed, or buffer lines; each call writes one whole line and flushes.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TextIO

# Reference §13 keys, the keys only its main.go uses, and the ones our additions need
# (`scope` for per-IP caps, `signal` for shutdown lines, `serial`/`not_after`/`days_left` for
# the certificate being served, `cluster`/`instance_id` for cluster mode's instance names,
# `header_name` for the name — never the value — of a header the gate found missing,
# `challenge` for an ACME challenge type, `endpoint`/`closed_by` for a WebSocket's end).
# Durations are integer milliseconds under keys ending in `_ms` (`duration_ms`, `retry_ms`,
# `wait_ms`) instead of the reference's `duration`, whose JSON form (Go's integer
# nanoseconds, unlabelled) misled operators.
ALLOWED_KEYS: frozenset[str] = frozenset(
    {
        "server_id",
        "conn_id",
        "binary_conn_id",
        "device_name",
        "remote",
        "binary_version",
        "err",
        "path",
        "from",
        "to",
        "close_code",
        "token_fp",
        "fcm_message_id",
        "duration_ms",
        "retry_ms",
        "wait_ms",
        "version",
        "mode",
        "listen",
        "domain",
        "cert_cache",
        "https_proxy_protocol",
        "env_var",
        "reason",
        "fix",
        "value",
        "effective_uid",
        "unexpected_ports",
        "expected_ports",
        "addr",
        "bypass_env_var",
        "scope",
        "signal",
        "serial",
        "not_after",
        "instance_id",
        "cluster",
        "header_name",
        "challenge",
        "days_left",
        "endpoint",
        "closed_by",
        "pid",
        "connections",
    }
)

_LEVELS: dict[str, int] = {"debug": -4, "info": 0, "warn": 4, "error": 8}
_LEVEL_NAMES: dict[int, str] = {-4: "DEBUG", 0: "INFO", 4: "WARN", 8: "ERROR"}

# Characters slog's text handler leaves unquoted: printable ASCII except space, '=' and '"'
# (backslash and DEL are in encoding/json's safe set, so slog leaves them bare too).
_TEXT_SAFE = re.compile(r"[\x21\x23-\x3c\x3e-\x7f]+")
_QUOTE_SAFE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_JSON_ESCAPE = re.compile(r'["\\\x00-\x1f\u2028\u2029\ud800-\udfff]')
_GO_ESCAPES = {
    "\a": r"\a",
    "\b": r"\b",
    "\f": r"\f",
    "\n": r"\n",
    "\r": r"\r",
    "\t": r"\t",
    "\v": r"\v",
}
_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _is_print(ch: str) -> bool:
    """Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols and ASCII space."""
    if ch == " ":
        return True
    return unicodedata.category(ch)[0] in "LMNPS"


def _needs_quoting(s: str) -> bool:
    # slog text_handler.go needsQuoting; non-ASCII spaces are never IsPrint, so one test covers
    # both of its non-ASCII conditions, and a lone surrogate stands in for invalid UTF-8.
    if _TEXT_SAFE.fullmatch(s):
        return False
    if not s:
        return True
    for ch in s:
        if ch < "\x80":
            if ch != "\\" and not _TEXT_SAFE.fullmatch(ch):
                return True
        elif not _is_print(ch):
            return True
    return False


def go_quote(s: str) -> str:
    """Go's strconv.Quote: a double-quoted literal with Go escapes; printable Unicode kept."""
    if _QUOTE_SAFE.fullmatch(s):
        return f'"{s}"'
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif o < 0x80 and 0x20 <= o < 0x7F:
            out.append(ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            # Go sees invalid UTF-8 bytes: surrogateescape stands for one raw byte, any other
            # lone surrogate for the three bytes it would encode to.
            raw = (
                bytes([o - 0xDC00])
                if 0xDC80 <= o <= 0xDCFF
                else ch.encode("utf-8", "surrogatepass")
            )
            out.extend(f"\\x{b:02x}" for b in raw)
        elif _is_print(ch):
            out.append(ch)
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


def _text_str(s: str) -> str:
    return go_quote(s) if _needs_quoting(s) else s


def _go_float(f: float) -> str:
    """strconv.FormatFloat(f, 'g', -1, 64): shortest digits, exponent form outside 1e-4..1e21."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    sign, digit_tuple, exponent = Decimal(repr(f)).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    exponent += len(digit_tuple) - len(digits)
    nd = len(digits)
    dp = nd + exponent  # value = 0.<digits> * 10**dp
    neg = "-" if sign else ""
    exp = dp - 1
    if exp < -4 or exp >= 6:
        # shortest 'g' uses precision 6 for this switch only; the mantissa keeps every digit
        mant = digits[0] + ("." + digits[1:] if nd > 1 else "")
        return f"{neg}{mant}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if dp <= 0:
        return f"{neg}0.{'0' * -dp}{digits}"
    if dp >= nd:
        return f"{neg}{digits}{'0' * (dp - nd)}"
    return f"{neg}{digits[:dp]}.{digits[dp:]}"


def _offset(dt: datetime) -> str:
    off = dt.utcoffset()
    if off is None or off == timedelta(0):
        return "Z"
    minutes = int(off.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    hh, mm = divmod(abs(minutes), 60)
    return f"{sign}{hh:02d}:{mm:02d}"


def _text_time(dt: datetime) -> str:
    """Go's `2006-01-02T15:04:05.000Z07:00` (slog truncates to milliseconds)."""
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}{_offset(dt)}"


def _json_time(dt: datetime) -> str:
    """Go's time.RFC3339Nano: fractional digits with trailing zeros trimmed."""
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return f"{dt:%Y-%m-%dT%H:%M:%S}{'.' + frac if frac else ''}{_offset(dt)}"


def _json_escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _JSON_ESCAPES:
        return _JSON_ESCAPES[ch]
    if "\ud800" <= ch <= "\udfff":
        return "\ufffd"  # invalid UTF-8 becomes U+FFFD, as in slog's JSON handler
    return f"\\u{ord(ch):04x}"


def _json_str(s: str) -> str:
    return '"' + _JSON_ESCAPE.sub(_json_escape_char, s) + '"'


def _err_text(e: BaseException) -> str:
    # Some Python exceptions have no message (TimeoutError()); the class name beats an empty value.
    return str(e) or type(e).__name__


def millis(seconds: float) -> int:
    """A duration in seconds as the integer milliseconds a `*_ms` key carries."""
    return round(seconds * 1000)


def _as_ms(v: object) -> object:
    # A `*_ms` key always holds an integer, in text and JSON alike, whatever the caller
    # passed: a timedelta is converted, a float (already milliseconds) rounded.
    if isinstance(v, timedelta):
        return millis(v.total_seconds())
    if isinstance(v, float) and math.isfinite(v):
        return round(v)
    return v


def _text_value(key: str, v: object) -> str:
    if key.endswith("_ms"):
        v = _as_ms(v)
    if isinstance(v, str):
        return _text_str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _go_float(v)
    if v is None:
        return '""'
    if isinstance(v, BaseException):
        return _text_str(_err_text(v))
    return _text_str(str(v))


def _json_value(key: str, v: object) -> str:
    if key.endswith("_ms"):
        v = _as_ms(v)
    if isinstance(v, str):
        return _json_str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else _json_str(_go_float(v))
    if v is None:
        return "null"
    if isinstance(v, BaseException):
        return _json_str(_err_text(v))
    return _json_str(str(v))


def _local_now() -> datetime:
    return datetime.now().astimezone()


class Logger:
    """A leveled key=value logger. Keys must come from `ALLOWED_KEYS`; `from_=` logs `from`."""

    def __init__(
        self,
        stream: TextIO,
        fmt: str = "text",
        level: str = "info",
        now: Callable[[], datetime] | None = None,
    ) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"unknown log format {fmt!r} (want text or json)")
        lvl = _LEVELS.get(level.lower())
        if lvl is None:
            raise ValueError(f"unknown log level {level!r} (want debug, info, warn or error)")
        self._stream = stream
        self._json = fmt == "json"
        self._min = lvl
        self._now = now or _local_now

    def enabled(self, level: str) -> bool:
        """Whether a line at `level` would be written."""
        return _LEVELS[level] >= self._min

    def debug(self, msg: str, **fields: object) -> None:
        self._log(-4, msg, fields)

    def info(self, msg: str, **fields: object) -> None:
        self._log(0, msg, fields)

    def warn(self, msg: str, **fields: object) -> None:
        self._log(4, msg, fields)

    def error(self, msg: str, **fields: object) -> None:
        self._log(8, msg, fields)

    def record(self, level: str, msg: str, fields: Mapping[str, object]) -> None:
        """Log an event assembled elsewhere (a boot refusal). Its keys are still checked
        against the allowlist at runtime; prefer the literal-keyword methods above."""
        self._log(_LEVELS[level], msg, dict(fields))

    def _log(self, lvl: int, msg: str, fields: dict[str, object]) -> None:
        # Keys are checked even when the level is filtered out, so tests at the default level
        # still catch a bad key on a debug line.
        keys = [k[:-1] if k.endswith("_") else k for k in fields]
        for k in keys:
            if k not in ALLOWED_KEYS:
                raise ValueError(f"log key {k!r} is not in ALLOWED_KEYS")
        if lvl < self._min:
            return
        dt = self._now()
        if dt.tzinfo is None:
            dt = dt.astimezone()
        level = _LEVEL_NAMES[lvl]
        values = fields.values()
        if self._json:
            parts = [f'{{"time":"{_json_time(dt)}","level":"{level}","msg":{_json_str(msg)}']
            parts.extend(f',"{k}":{_json_value(k, v)}' for k, v in zip(keys, values, strict=True))
            line = "".join(parts) + "}\n"
        else:
            parts = [f"time={_text_time(dt)} level={level} msg={_text_str(msg)}"]
            parts.extend(f" {k}={_text_value(k, v)}" for k, v in zip(keys, values, strict=True))
            line = "".join(parts) + "\n"
        try:
            self._stream.write(line)
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken log stream must not take the relay down (slog ignores
            # write errors too).
            pass
