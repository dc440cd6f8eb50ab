"""Go's `time.Duration` in text: parsing (`time.ParseDuration`, plus bare seconds) and
formatting (`Duration.String()`), the one implementation flags, help and logs share.

Owns: the syntax both ways. Must never: echo the text it refuses (a value may come from the
environment).
"""

from __future__ import annotations

import re
from typing import Final

_INT64_MAX: Final = (1 << 63) - 1
_NS_PER_S: Final = 1_000_000_000


class DurationError(ValueError):
    """Not a duration; the message says why, without the text."""


_DURATION_UNITS: Final[dict[str, int]] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign, as Go accepts
    "\u03bcs": 1_000,  # Greek mu, as Go accepts
    "ms": 1_000_000,
    "s": _NS_PER_S,
    "m": 60 * _NS_PER_S,
    "h": 3600 * _NS_PER_S,
}
_BARE_SECONDS: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DURATION_PART: Final = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def _parse_duration_ns(text: str) -> int:
    """Go's time.ParseDuration (integer nanoseconds), plus bare seconds; negatives refused."""
    s = text
    negative = False
    if s[:1] in ("+", "-"):
        negative = s[0] == "-"
        s = s[1:]
    if _BARE_SECONDS.fullmatch(s):
        s += "s"
    if not s:
        raise DurationError("not a duration")
    total = 0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        # The pattern always matches (possibly empty); an empty match means a stray character.
        if m is None or m.end() == pos:
            raise DurationError("not a duration")
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac:
            raise DurationError("not a duration")
        if unit not in _DURATION_UNITS:
            # The unit text is not echoed: it is part of a value that may come from the env.
            raise DurationError("not a duration" if not unit else "not a duration (unknown unit)")
        scale = _DURATION_UNITS[unit]
        # Integer arithmetic like Go: digits beyond nanosecond precision are truncated.
        part = int(whole or "0") * scale
        if frac:
            part += int(frac) * scale // 10 ** len(frac)
        total += part
        if total > _INT64_MAX:
            raise DurationError("duration out of range")
        pos = m.end()
    if negative and total != 0:
        raise DurationError("negative duration not allowed")
    return total


def parse_duration(text: str) -> float:
    """Parse `30s`, `250ms`, `1m30s`, `1.5h`, or bare seconds `0.2` into float seconds."""
    return _parse_duration_ns(text) / _NS_PER_S


def format_duration(seconds: float) -> str:
    """Go's Duration.String() for a duration in seconds (rounded to nanoseconds); parse_duration
    reads it back."""
    u = round(seconds * 1e9)
    neg = u < 0
    u = abs(u)
    if u == 0:
        return "0s"
    if u < 1_000_000_000:
        if u < 1_000:
            unit, prec = "ns", 0
        elif u < 1_000_000:
            unit, prec = "\u00b5s", 3
        else:
            unit, prec = "ms", 6
        text = _frac(u, prec) + unit
    else:
        text = _frac(u, 9) + "s"
        minutes = u // 1_000_000_000 // 60
        if minutes:
            hours = minutes // 60
            text = f"{minutes % 60}m{text}"
            if hours:
                text = f"{hours}h{text}"
    return ("-" if neg else "") + text


def _frac(u: int, prec: int) -> str:
    # Go's fmtInt(fmtFrac(...)) for the lowest unit: whole part mod 60 only when prec == 9
    scale = 10**prec
    whole, frac = divmod(u, scale)
    if prec == 9:
        whole %= 60
    tail = f"{frac:0{prec}d}".rstrip("0") if prec else ""
    return f"{whole}.{tail}" if tail else str(whole)
