"""Every log call in the source uses a literal event name and allowlisted keys only.

The Python counterpart of the reference's log_keys_test.go (reference §13): a log key outside
ALLOWED_KEYS, a `**kwargs` expansion (keys unknown until run time) or a computed event name fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pyrycode_relay.ops.log import ALLOWED_KEYS

SRC = Path(__file__).resolve().parents[2] / "src" / "pyrycode_relay"
LEVEL_METHODS = frozenset({"debug", "info", "warn", "error"})
LOGGER_NAMES = frozenset({"log", "logger", "_log"})


def _receiver_name(node: ast.expr) -> str | None:
    """`log` for `log.info`, `self._log.info`, `ctx.logger.info`; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def check_source(source: str, filename: str) -> list[str]:
    """Violations in one file, as `file:line: reason`."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in LEVEL_METHODS:
            continue
        if _receiver_name(node.func.value) not in LOGGER_NAMES:
            continue
        where = f"{filename}:{node.lineno}"
        first = node.args[0] if node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            problems.append(f"{where}: event name must be a string literal")
        if len(node.args) > 1 or any(isinstance(a, ast.Starred) for a in node.args):
            problems.append(f"{where}: only the event name may be positional")
        for kw in node.keywords:
            if kw.arg is None:
                problems.append(f"{where}: **kwargs expansion hides log keys from this check")
                continue
            key = kw.arg[:-1] if kw.arg.endswith("_") else kw.arg
            if key not in ALLOWED_KEYS:
                problems.append(f"{where}: log key {key!r} is not in ALLOWED_KEYS")
    return problems


def test_source_tree_uses_only_allowlisted_keys() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no sources under {SRC}; the test is looking in the wrong place"
    problems: list[str] = []
    for path in files:
        problems += check_source(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))
    assert problems == []


def test_checker_accepts_good_calls() -> None:
    good = """
log.info("server_claimed", server_id=sid, remote=ip)
self._log.warn("rate_limited", remote=go_quote(ip))
ctx.logger.debug("phone_forwarder_read_end", from_=a, to=b, duration_ms=1500)
http.error(w, "", 503)          # not a logger receiver: ignored
logging.getLogger().info(x)     # receiver is a call: ignored
"""
    assert check_source(good, "good.py") == []


def test_checker_catches_each_violation() -> None:
    bad = """
log.info("server_claimed", token="secret")
self.logger.warn("rate_limited", **extra)
self._log.error(event_name, err=e)
log.debug(f"phone {x}", conn_id=c)
log.info("a", "b")
logger.info("x", header_=h)
"""
    problems = check_source(bad, "bad.py")
    assert any("bad.py:2" in p and "'token'" in p for p in problems)
    assert any("bad.py:3" in p and "**kwargs" in p for p in problems)
    assert any("bad.py:4" in p and "string literal" in p for p in problems)
    assert any("bad.py:5" in p and "string literal" in p for p in problems)
    assert any("bad.py:6" in p and "positional" in p for p in problems)
    assert any("bad.py:7" in p and "'header'" in p for p in problems)
    assert len(problems) == 6
