"""ops.logbridge: what Python and libraries report on their own becomes relay log lines.

Each case runs in a fresh interpreter (the hooks are process-wide, and this process's
warnings belong to pytest), writes JSON logs, and every line it prints must parse."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

PRELUDE = """
import logging, sys, threading, warnings
from pyrycode_relay.ops import logbridge
from pyrycode_relay.ops.log import Logger
logbridge.install(Logger(sys.stderr, "json", LEVEL))
"""
SECRET = "peer-data-7f3a"  # in exception messages: must never be logged


def run(body: str, level: str = "info") -> tuple[int, list[dict[str, Any]]]:
    source = PRELUDE.replace("LEVEL", repr(level)) + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-c", source],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.stdout == "", proc.stdout
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert SECRET not in proc.stderr, proc.stderr
    return proc.returncode, records


def test_a_warning_is_one_line_naming_its_source() -> None:
    code, records = run("warnings.warn('old API', DeprecationWarning)")
    assert code == 0
    [r] = records
    assert r["level"] == "WARN" and r["msg"] == "python warning"
    assert r["err"] == "DeprecationWarning: old API"
    assert r["from"] == "<string>:6"


def test_library_records_map_to_relay_levels_and_debug_is_never_passed_on() -> None:
    body = """
    lib = logging.getLogger("somelib.client")
    lib.debug("debug detail %s", 1)
    lib.info("request %s", "GET /x")
    lib.warning("retrying %d", 3)
    lib.error("gave up after %d tries", 3)
    """
    _, at_info = run(body)
    assert [(r["level"], r["msg"], r["from"], r["path"], r["err"]) for r in at_info] == [
        ("WARN", "library log", "somelib.client", "<string>:10", "retrying %d"),
        ("ERROR", "library log", "somelib.client", "<string>:11", "gave up after %d tries"),
    ]
    _, at_debug = run(body, level="debug")
    assert [(r["level"], r["err"]) for r in at_debug] == [
        ("DEBUG", "request %s"),
        ("WARN", "retrying %d"),
        ("ERROR", "gave up after %d tries"),
    ]


def test_a_record_says_its_template_and_exception_type_never_its_data() -> None:
    code, records = run(
        f"""
        lib = logging.getLogger("lib")
        try:
            raise ConnectionResetError({SECRET!r})
        except OSError:
            lib.exception("lost the connection to %s", {SECRET!r})
        lib.warning("message handled: " + {SECRET!r})  # formatted by the library itself
        lib.warning("bad %d template", {SECRET!r})
        """
    )
    assert code == 0
    assert [r.get("err") for r in records] == [
        "lost the connection to %s: ConnectionResetError",
        None,
        "bad %d template",
    ]
    assert all(r["from"] == "lib" for r in records)


def test_exceptions_python_can_only_report_are_internal_errors() -> None:
    code, records = run(
        f"""
        class Leaky:
            def __del__(self):
                raise ValueError({SECRET!r})
        Leaky()
        def boom():
            raise KeyError({SECRET!r})
        t = threading.Thread(target=boom)
        t.start(); t.join()
        raise RuntimeError({SECRET!r})
        """
    )
    assert code == 1  # the uncaught exception still fails the process
    assert [(r["level"], r["msg"], r["err"]) for r in records] == [
        ("ERROR", "internal error", "ValueError"),
        ("ERROR", "internal error", "KeyError"),
        ("ERROR", "internal error", "RuntimeError"),
    ]
    assert [r["from"] for r in records] == ["<string>:9", "<string>:12", "<string>:15"]
