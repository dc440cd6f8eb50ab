"""What each mode loads: insecure mode (behind a TLS-terminating proxy) imports no TLS code
and none of the libraries only TLS, push or cluster mode need (ADR 0007, README §5)."""

from __future__ import annotations

import subprocess
import sys

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
