"""The operator documentation is checked against the code, a live relay and the test suite:

- every flag the CLI accepts (core.config) is in docs/operations.md's flag table, with the
  default `--help` prints, and the table lists nothing else;
- every series a started relay exposes on /metrics, plus the push series that exists only when
  push is configured (reference §8.2/§12), is in docs/metrics.md with all its label values, and
  the Grafana dashboard charts every one of them;
- every test docs/threat-model.md cites exists, and every threat in its table cites one;
- the README links the documents and keeps exactly two set-up commands.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from pyrycode_relay import __version__
from pyrycode_relay.core.config import env_var_for, flag_names, usage
from tests.e2e.harness import http_request, start_relay

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# Series that exist only when push is configured (PYRYCODE_RELAY_FCM_CREDENTIALS), so a relay
# started here does not expose them; names and labels from reference §8.2 and §12.
PUSH_SERIES = {
    "pyrycode_relay_push_wakes_total": {
        "outcome": ("sent", "unregistered", "send_failed", "token_fetch_failed", "dropped")
    },
}
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def flag_table() -> dict[str, str]:
    """docs/operations.md's flag table: {flag name: default as written}."""
    text = (DOCS / "operations.md").read_text()
    section = text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `--([a-z0-9-]+)` \| `([^`]*)` \|", section, re.M)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "a flag is listed twice"
    return dict(rows)


def usage_defaults() -> dict[str, str]:
    """What `pyrycode-relay --help` prints as each flag's default."""
    return dict(re.findall(r"^  --([a-z0-9-]+) \S+ .*\(default (.*)\)$", usage(), re.M))


def test_every_cli_flag_is_documented() -> None:
    table = flag_table()
    assert set(table) == set(flag_names()), (
        f"undocumented: {sorted(set(flag_names()) - set(table))}; "
        f"not flags: {sorted(set(table) - set(flag_names()))}"
    )
    defaults = usage_defaults()
    assert set(defaults) == set(flag_names())
    for name, default in table.items():
        assert default == defaults[name], (
            f"--{name}: doc says {default}, --help says {defaults[name]}"
        )
    # The environment rule the table relies on holds for every flag but --version.
    ops = (DOCS / "operations.md").read_text()
    assert "PYRYCODE_RELAY_<NAME_IN_UPPER_SNAKE>" in ops
    assert env_var_for("max-connections") == "PYRYCODE_RELAY_MAX_CONNECTIONS"
    assert "PYRYCODE_RELAY_MAX_CONNECTIONS" in ops


async def scrape_series() -> dict[str, dict[str, set[str]]]:
    """{series name: {label: values}} from a started relay's /metrics."""
    async with start_relay() as relay:
        status, _, body = await http_request(relay.metrics_port, "GET", "/metrics")
    assert status == 200
    series: dict[str, dict[str, set[str]]] = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.fullmatch(line)
        assert m is not None, line
        labels = series.setdefault(m.group(1), {})
        for key, value in _LABEL.findall(m.group(2) or ""):
            labels.setdefault(key, set()).add(value)
    return series


def metrics_doc_rows() -> dict[str, str]:
    """docs/metrics.md's series table: {series name: the whole row}."""
    text = (DOCS / "metrics.md").read_text()
    section = text.split("\n## Series\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_:]+)` \|.*$", section, re.M)}


async def test_every_exposed_metric_is_documented() -> None:
    exposed = await scrape_series()
    assert "pyrycode_relay_connected_phones" in exposed  # the scrape really parsed
    push = {name: {k: set(v) for k, v in labels.items()} for name, labels in PUSH_SERIES.items()}
    expected = {**exposed, **push}
    rows = metrics_doc_rows()
    assert set(rows) == set(expected), (
        f"undocumented: {sorted(set(expected) - set(rows))}; "
        f"documented but not exposed: {sorted(set(rows) - set(expected))}"
    )
    for name, labels in expected.items():
        for label, values in labels.items():
            assert f"`{label}`" in rows[name], f"{name}: label {label} not documented"
            for value in values:
                assert f"`{value}`" in rows[name], f"{name}: {label}={value} not documented"
    alerts = (DOCS / "metrics.md").read_text().split("\n## What to alert on\n", 1)[1]
    assert "pyrycode_relay_push_wakes_total" in alerts


def test_grafana_dashboard_charts_every_series() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    charted = {n for e in exprs for n in re.findall(r"\b(?:pyrycode_relay|promhttp)_\w+", e)}
    assert charted == set(metrics_doc_rows())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"  # importable anywhere


def cited_tests(text: str) -> list[tuple[str, str]]:
    return re.findall(r"(tests/[\w/]+\.py)::(\w+)", text)


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


def test_threat_model_cites_only_existing_tests() -> None:
    text = (DOCS / "threat-model.md").read_text()
    cited = cited_tests(text)
    assert len(cited) >= 24
    for file, name in cited:
        path = ROOT / file
        assert path.is_file(), f"threat-model.md cites a missing file {file}"
        assert name in defined_tests(path), f"threat-model.md cites missing {file}::{name}"


def test_every_threat_names_a_test() -> None:
    text = (DOCS / "threat-model.md").read_text()
    rows = re.findall(r"^\| (T[0-9]+) \|.*$", text, re.M)
    lines = [line for line in text.splitlines() if re.match(r"^\| T[0-9]+ \|", line)]
    assert len(rows) == len(lines) >= 20
    assert rows == [f"T{i}" for i in range(1, len(rows) + 1)], "threat ids must be T1..Tn"
    for line in lines:
        proven_by = line.rstrip(" |").rsplit(" | ", 1)[1]
        assert cited_tests(proven_by), f"no test named for: {line[:80]}"


def test_readme_links_the_docs_and_keeps_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in (
        "docs/operations.md",
        "docs/metrics.md",
        "docs/threat-model.md",
        "CHANGELOG.md",
        "pyrycode-relay probe",
    ):
        assert target in readme, target
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"```sh\n", section)) == 2


def test_changelog_has_an_entry_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, re.M)
    assert headings and headings[0] == "Unreleased"
    assert f"## [{__version__}]" in changelog or f"released as {__version__}" in changelog
    for heading in headings[1:]:
        assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", heading), heading
    assert "Versioning policy" in changelog
