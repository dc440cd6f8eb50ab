"""What each mode loads: insecure mode (behind a TLS-terminating proxy) imports no TLS code
and none of the libraries only TLS, push or cluster mode need (ADR 0007, README §5); and no
serving code imports the tools (only the CLI's dispatch does, lazily)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ONLY_WHEN_NEEDED = ("cryptography", "acme", "josepy", "OpenSSL", "httpx", "google", "redis")


def loaded_after(*modules: str) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('\\n'.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(out.stdout.split())


def test_insecure_mode_loads_no_tls_push_or_cluster_library() -> None:
    loaded = loaded_after("pyrycode_relay.cli", "pyrycode_relay.server")
    heavy = sorted(m for m in loaded if m.split(".")[0] in ONLY_WHEN_NEEDED)
    assert heavy == []
    assert sorted(m for m in loaded if m.startswith("pyrycode_relay.tls")) == []
    assert "pyrycode_relay.cluster.placement" not in loaded


def test_the_tls_modes_load_theirs() -> None:
    loaded = loaded_after("pyrycode_relay.tls.mode")
    assert {"cryptography", "pyrycode_relay.tls.acme"} <= loaded


def _tool_imports(nodes: Sequence[ast.AST]) -> list[int]:
    """The lines of `nodes` that import pyrycode_relay.tools or a module in it."""
    lines = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        if any(n == "pyrycode_relay.tools" or n.startswith("pyrycode_relay.tools.") for n in names):
            lines.append(node.lineno)
    return lines


def test_serving_code_never_imports_the_tools() -> None:
    package = Path(__file__).resolve().parents[1] / "src" / "pyrycode_relay"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] == "tools":
            continue
        tree = ast.parse(path.read_text())
        # The CLI's dispatch may import a tool inside a function, never at module level.
        nodes = tree.body if rel == Path("cli.py") else list(ast.walk(tree))
        offenders += [f"{rel}:{line}" for line in _tool_imports(nodes)]
    assert offenders == []
    loaded = loaded_after("pyrycode_relay.cli", "pyrycode_relay.server")
    assert not [m for m in loaded if m.startswith("pyrycode_relay.tools")]
