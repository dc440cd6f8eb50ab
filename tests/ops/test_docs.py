"""The operator documentation is checked against the code, a live relay and the test suite:

- every flag the CLI accepts (core.config) is in docs/operations.md's flag table, with the
  default `--help` prints, and the table lists nothing else;
- every series a started relay exposes on /metrics, plus the push series that exists only when
  push is configured (reference §8.2/§12) and the cluster series that exist only in cluster mode
  (README §5; checked against a relay started on a real redis-server), is in docs/metrics.md with
  all its label values, and the Grafana dashboard charts every one of them;
- the least-privilege Redis ACL user docs/cluster.md recommends is enough for a cluster: two
  relays logged in as that user claim, admit, route both ways, renew and hand back, and Redis
  refuses none of their commands;
- every test docs/threat-model.md cites exists, and every threat in its table cites one;
- the README links the documents and keeps exactly two set-up commands;
- a release tag the docs name exists.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import secrets
import shlex
from pathlib import Path

from pyrycode_relay import __version__
from pyrycode_relay.core.config import env_var_for, flag_names, usage
from tests.e2e.clusterharness import redis_server
from tests.e2e.harness import binary, http_request, phone, recv, start_relay

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# Series that exist only when push is configured (PYRYCODE_RELAY_FCM_CREDENTIALS), so a relay
# started here does not expose them; names and labels from reference §8.2 and §12.
PUSH_SERIES: dict[str, dict[str, tuple[str, ...]]] = {
    "pyrycode_relay_push_wakes_total": {
        "outcome": ("sent", "unregistered", "send_failed", "token_fetch_failed", "dropped")
    },
}
# Series that exist only in cluster mode (--cluster-redis), so a single-instance relay does not
# expose them; test_cluster_series_are_exactly_the_documented_ones scrapes a clustered relay.
CLUSTER_SERIES: dict[str, dict[str, tuple[str, ...]]] = {
    "pyrycode_relay_cluster_bus_messages_total": {"direction": ("publish", "receive")},
    "pyrycode_relay_cluster_remote_phones": {},
    "pyrycode_relay_cluster_redis_up": {},
    "pyrycode_relay_cluster_lease_renew_failures_total": {},
}
# Exists only in a TLS mode once a certificate is served; tests/e2e/test_connection_end.py
# scrapes it from a static-TLS relay.
TLS_SERIES: dict[str, dict[str, tuple[str, ...]]] = {
    "pyrycode_relay_tls_certificate_not_after_seconds": {},
}
# Labels whose values describe the build rather than come from a closed set.
OPEN_LABELS = {
    ("pyrycode_relay_build_info", "version"),
    ("pyrycode_relay_build_info", "revision"),
    ("pyrycode_relay_build_info", "python"),
}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
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


async def scrape_series(*flags: str) -> dict[str, dict[str, set[str]]]:
    """{series name: {label: values}} from the /metrics of a relay started with `flags`."""
    async with start_relay(*flags) as relay:
        status, _, body = await http_request(relay.metrics_port, "GET", "/metrics")
    assert status == 200
    text = body.decode()
    histograms = set(re.findall(r"^# TYPE (\S+) histogram$", text, re.M))
    series: dict[str, dict[str, set[str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.fullmatch(line)
        assert m is not None, line
        name = family_of(m.group(1), histograms)
        labels = series.setdefault(name, {})
        for key, value in _LABEL.findall(m.group(2) or ""):
            labels.setdefault(key, set()).add(value)
    return series


def family_of(sample: str, histograms: set[str]) -> str:
    """A histogram's `_bucket`/`_sum`/`_count` sample names fold into its family's name."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if sample.endswith(suffix) and sample.removesuffix(suffix) in histograms:
            return sample.removesuffix(suffix)
    return sample


def documented_value(value: str) -> str:
    """How a label value is written in the docs: `le` bounds without a trailing `.0`."""
    return value if value == "+Inf" else f"{float(value):g}"


def as_sets(labels: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    return {label: set(values) for label, values in labels.items()}


def metrics_doc_rows() -> dict[str, str]:
    """docs/metrics.md's series table: {series name: the whole row}."""
    text = (DOCS / "metrics.md").read_text()
    section = text.split("\n## Series\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_:]+)` \|.*$", section, re.M)}


async def test_every_exposed_metric_is_documented() -> None:
    exposed = await scrape_series()
    assert "pyrycode_relay_connected_phones" in exposed  # the scrape really parsed
    assert not set(exposed) & set(CLUSTER_SERIES), "a cluster series outside cluster mode"
    extra = {**PUSH_SERIES, **CLUSTER_SERIES, **TLS_SERIES}
    expected = {**exposed, **{n: as_sets(labels) for n, labels in extra.items()}}
    rows = metrics_doc_rows()
    assert set(rows) == set(expected), (
        f"undocumented: {sorted(set(expected) - set(rows))}; "
        f"documented but not exposed: {sorted(set(rows) - set(expected))}"
    )
    for name, labels in expected.items():
        for label, values in labels.items():
            assert f"`{label}`" in rows[name], f"{name}: label {label} not documented"
            if (name, label) in OPEN_LABELS:
                continue
            for value in values:
                shown = documented_value(value) if label == "le" else value
                assert f"`{shown}`" in rows[name], f"{name}: {label}={shown} not documented"
    for name in CLUSTER_SERIES:
        assert "only in cluster mode" in rows[name], f"{name}: not marked cluster-only"
    alerts = (DOCS / "metrics.md").read_text().split("\n## What to alert on\n", 1)[1]
    assert "pyrycode_relay_push_wakes_total" in alerts
    assert "pyrycode_relay_cluster_redis_up" in alerts


async def test_cluster_series_are_exactly_the_documented_ones() -> None:
    single = await scrape_series()
    async with redis_server() as redis:
        clustered = await scrape_series(f"--cluster-redis={redis.url}", "--cluster-lease=1s")
    assert clustered["pyrycode_relay_cluster_redis_up"] == {}  # the scrape really parsed
    assert set(single) <= set(clustered), "cluster mode hides a series"
    only_cluster = {name: labels for name, labels in clustered.items() if name not in single}
    assert only_cluster == {name: as_sets(labels) for name, labels in CLUSTER_SERIES.items()}


def test_grafana_dashboard_charts_every_series() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b(?:pyrycode_relay|promhttp)_\w+", e)}
    rows = set(metrics_doc_rows())
    charted = {family_of(n, rows) for n in names}
    assert charted == rows
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"  # importable anywhere


def documented_acl(password: str) -> list[str]:
    """docs/cluster.md's `ACL SETUSER …` line as Redis command arguments, with `password`."""
    text = (DOCS / "cluster.md").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("ACL SETUSER ")]
    assert len(lines) == 1, lines
    args = shlex.split(lines[0])
    assert ">PASSWORD" in args, args
    return [f">{password}" if arg == ">PASSWORD" else arg for arg in args]


def acl_denials(log: object) -> list[str]:
    """The objects (commands, keys, channels) in an `ACL LOG` reply (RESP2: flat pairs)."""
    assert isinstance(log, list), log
    denied = []
    for entry in log:
        assert isinstance(entry, list), entry
        fields = dict(zip(entry[::2], entry[1::2], strict=True))
        obj = fields.get(b"object", b"?")
        assert isinstance(obj, bytes), fields
        denied.append(obj.decode())
    # redis-py announces itself with CLIENT SETINFO (Redis >= 7.2) and ignores a refusal.
    return [obj for obj in denied if obj != "client|setinfo"]


async def test_documented_acl_user_is_enough_for_a_cluster() -> None:
    password = f"acl-{secrets.token_hex(8)}"
    sid = "acl-check"
    async with redis_server() as redis:
        assert await redis.command(*documented_acl(password)) == "OK"
        # the URL from the environment, as docs/cluster.md recommends for a password
        env = {"PYRYCODE_RELAY_CLUSTER_REDIS": f"redis://relay:{password}@127.0.0.1:{redis.port}"}
        async with (
            start_relay("--instance-id=a1", "--cluster-lease=1s", env=env) as r1,
            start_relay("--instance-id=a2", "--cluster-lease=1s", env=env) as r2,
        ):
            b = await binary(r1, sid)
            assert await redis.owner(sid) == "a1"  # claimed before the binary's 101
            p = await phone(r2, sid)
            await p.send('{"up":1}')
            envelope = json.loads(await recv(b))
            assert envelope["frame"] == {"up": 1}
            await b.send(json.dumps({"conn_id": envelope["conn_id"], "frame": {"down": 1}}))
            assert json.loads(await recv(p)) == {"down": 1}
            await asyncio.sleep(0.5)  # past one renewal and peer check (lease/3)
            for r in (r1, r2):
                m = await r.metrics()
                assert m["pyrycode_relay_cluster_redis_up"] == 1
                assert m["pyrycode_relay_cluster_lease_renew_failures_total"] == 0
            assert await r1.stop() == 0  # an orderly exit deletes its keys
            assert await redis.owner(sid) is None
            assert not await redis.instance_live("a1")
            for r in (r1, r2):
                assert password not in r.log
                assert "cluster_redis_down" not in r.log
        assert acl_denials(await redis.command("ACL", "LOG")) == []


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
        "docs/cluster.md",
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


def test_docs_name_only_release_tags_that_exist() -> None:
    """A `git checkout vX.Y.Z` or `--branch vX.Y.Z` in the docs must be a tag of this repo."""
    import subprocess

    tags = set(
        subprocess.run(
            ["git", "-C", str(ROOT), "tag", "--list"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )
    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for tag in re.findall(r"(?:checkout|--branch)\s+(v\d+\.\d+\.\d+)", doc.read_text()):
            assert tag in tags, f"{doc.name} names tag {tag}, which does not exist"
