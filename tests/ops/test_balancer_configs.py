"""The load-balancer configs in deploy/: docs/cluster.md shows each one verbatim, each is
valid for its program as shipped and as the tests and the bench run it, and the run differs
from the shipped file only in addresses and ports (and the baseline in its balancing line).
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from pyrycode_relay.tools.bench import balancer

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "cluster.md"


@pytest.mark.parametrize("kind", balancer.KINDS)
def test_docs_show_the_deploy_file_verbatim(kind: str) -> None:
    text = balancer.deploy_file(kind).read_text(encoding="utf-8")
    fence = "haproxy" if kind == "haproxy" else "nginx"
    block = f"```{fence}\n{text}```\n"
    assert block in DOCS.read_text(encoding="utf-8"), (
        f"docs/cluster.md must show deploy/{balancer.FILES[kind]} verbatim in a ```{fence} block"
    )


@pytest.mark.parametrize("kind", balancer.KINDS)
def test_the_tests_run_the_deploy_file_with_only_addresses_changed(kind: str) -> None:
    shipped = balancer.deploy_file(kind).read_text(encoding="utf-8").splitlines()
    hashed = balancer.render(kind, 18080, [18081, 18082, 18083]).splitlines()
    changed = [
        line
        for line in difflib.unified_diff(shipped, hashed, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(changed) == 2 * 4, changed  # the listener and three instances
    for line in changed:
        assert ("127.0.0.1:808" in line) if line[0] == "-" else ("127.0.0.1:1808" in line)
    baseline = balancer.render(kind, 18080, [18081, 18082, 18083], round_robin=True)
    removed = set(hashed) - set(baseline.splitlines())
    assert removed == {balancer.HASH_LINES[kind].rstrip("\n")}


def test_a_drifted_file_is_refused_not_half_rendered() -> None:
    text = balancer.deploy_file("haproxy").read_text(encoding="utf-8")
    with pytest.raises(balancer.ConfigDrift, match=re.escape("127.0.0.1:8082")):
        balancer.render("haproxy", 1, [2, 3, 4], text=text.replace("127.0.0.1:8082", "x:1"))


@pytest.mark.parametrize("kind", balancer.KINDS)
@pytest.mark.parametrize("round_robin", [False, True], ids=["hash", "roundrobin"])
def test_the_program_accepts_the_config(kind: str, round_robin: bool) -> None:
    if balancer.program(kind) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{kind} is missing; scripts/test.sh must install it")
        pytest.skip(f"{kind} not installed (scripts/test.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="relay-lbcheck-") as tmp:
        workdir = Path(tmp)
        text = balancer.render(kind, 18080, [18081, 18082, 18083], round_robin=round_robin)
        config = balancer.write_config(kind, workdir, text)
        argv = balancer.argv(kind, config, workdir)
        argv.insert(1, "-c" if kind == "haproxy" else "-t")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
