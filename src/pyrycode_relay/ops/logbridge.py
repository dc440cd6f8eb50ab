"""Python's own reporting channels, routed into the relay's log.

Owns: the hooks that turn what Python and libraries would print themselves into relay log
lines: `warnings` (`msg="python warning"`), stdlib `logging` records from any library
(`msg="library log"`), and the exceptions Python can only report (`sys.unraisablehook`,
`threading.excepthook`, an uncaught exception in the main thread, and the event loop's
exception handler: `msg="internal error"`).
So every line the process writes has the chosen format and allowlisted keys only.
Must never: let a library write to stdout or stderr on its own, pass a library's DEBUG
records on (they may carry request bodies or headers), log the text of a message a library
formatted itself, an exception's traceback or a bug's message (any may carry peer data), or
raise from a hook.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

from pyrycode_relay.ops.log import Logger

MAX_TEXT = 2000  # characters of a library's message kept; the logger escapes the rest


def install(log: Logger) -> None:
    """Route every channel to `log`, for the rest of the process."""

    def show_warning(  # noqa: PLR0917 - warnings.showwarning's own signature
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = _clip(f"{category.__name__}: {message}")
        log.warn("python warning", from_=_source(filename, lineno), err=text)

    def unraisable(args: sys.UnraisableHookArgs) -> None:
        log.error("internal error", err=args.exc_type.__name__, from_=_where(args.exc_traceback))

    def thread_exception(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            log.error(
                "internal error", err=args.exc_type.__name__, from_=_where(args.exc_traceback)
            )

    def uncaught(kind: type[BaseException], _: BaseException, tb: TracebackType | None) -> None:
        log.error("internal error", err=kind.__name__, from_=_where(tb))

    warnings.showwarning = show_warning
    sys.unraisablehook = unraisable
    threading.excepthook = thread_exception
    sys.excepthook = uncaught
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_Handler(log))
    # A library's INFO is the relay's debug; below that nothing is passed on, so nothing
    # below the least level that can be printed is even formatted.
    root.setLevel(logging.INFO if log.enabled("debug") else logging.WARNING)
    logging.lastResort = None  # a record no handler takes is dropped, not printed bare


def _source(filename: str, lineno: int) -> str:
    """`package/module.py:line` for code under site-packages, else the file's name."""
    marker = f"site-packages{os.sep}"
    at = filename.rfind(marker)
    tail = filename[at + len(marker) :] if at >= 0 else os.path.basename(filename)
    return f"{tail}:{lineno}"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


def loop_exception_handler(log: Logger) -> Callable[[object, dict[str, Any]], None]:
    """For `loop.set_exception_handler`: a bug in a callback or task is one `internal
    error` line (type and place), instead of asyncio's traceback dump."""

    def handle(_loop: object, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            log.error("internal error", err=type(exc).__name__, from_=_where(exc.__traceback__))
        else:
            log.error("internal error", err="unknown")

    return handle


def _where(tb: TracebackType | None) -> str:
    """The innermost frame of a traceback as `file:line`: where, never what."""
    if tb is None:
        return "unknown"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _source(tb.tb_frame.f_code.co_filename, tb.tb_lineno)


class _Handler(logging.Handler):
    """A library's record as a relay line: its logger (`from`), the place in its code
    (`path`), and (`err`) the message's template when the record carries its data apart
    (`log.warning("lost %s", x)`: the template, never `x`), plus an exception's type. A
    message formatted before logging may hold anything (a peer's frame, a URL with a
    password), so its text is left out."""

    def __init__(self, log: Logger) -> None:
        super().__init__(logging.INFO)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, object] = {
            "from": record.name,
            "path": _source(record.pathname, record.lineno),
        }
        parts = [_clip(str(record.msg))] if record.args else []
        if record.exc_info is not None and record.exc_info[0] is not None:
            parts.append(record.exc_info[0].__name__)
        if parts:
            fields["err"] = ": ".join(parts)
        if record.levelno >= logging.ERROR:
            level = "error"
        elif record.levelno >= logging.WARNING:
            level = "warn"
        else:
            level = "debug"
        self._log.record(level, "library log", fields)
