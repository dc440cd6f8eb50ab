"""deploy/alerts.yml is docs/metrics.md's alert table, and promtool accepts both it and a live
relay's /metrics:

- every row of the table is a rule of the same name, expression and duration, and the file
  holds nothing else; `promtool check rules` accepts the file, and `promtool test rules` shows
  the certificate alerts fire on the days the docs give;
- `promtool check metrics` finds nothing to lint in the scrape of a static-TLS relay that has
  served a binary and a phone (every family, including the histograms and the certificate
  gauge, has samples).

promtool comes with Debian's `prometheus` package (scripts/test-deps.sh installs it); its
absence fails these tests rather than skipping them.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

from pyrycode_relay.tools.bench.ports import free_port
from tests.certs import make_ca, write_leaf
from tests.e2e.harness import http_request
from tests.e2e.tlsharness import DOMAIN, client_context, start_tls_relay, tls_binary, tls_phone

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
# What the file writes for the docs' placeholders (the flags' defaults).
PLACEHOLDERS = {"<max-connections>": "1000", "<max-buffered-bytes>": "67108864"}


def promtool(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    assert PROMTOOL is not None, "promtool is missing: scripts/test-deps.sh installs it"
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, timeout=30, check=False
    )


def documented_alerts() -> dict[str, tuple[str, str | None]]:
    """docs/metrics.md's alert table: {rule name: (expression, duration or None)}."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    section = text.split("\n## What to alert on\n", 1)[1].split("\n## ", 1)[0]
    out: dict[str, tuple[str, str | None]] = {}
    for m in re.finditer(r"^\| [^|]*\(`(\w+)`\) \| `(.+?)`(?: for (\w+))? \| ", section, re.M):
        expr = m.group(2).replace("\\|", "|")
        for placeholder, value in PLACEHOLDERS.items():
            expr = expr.replace(placeholder, value)
        assert m.group(1) not in out, f"{m.group(1)} twice"
        out[m.group(1)] = (expr, m.group(3))
    return out


def file_alerts() -> dict[str, tuple[str, str | None]]:
    """The rules file's {alert: (expr, for)}. It is written in one fixed shape (a plain
    one-line `expr`), so a pattern reads it without a YAML dependency; promtool checks
    that it is the YAML it looks like."""
    out: dict[str, tuple[str, str | None]] = {}
    for rule in ALERTS.read_text().split("\n      - alert: ")[1:]:
        name, _, body = rule.partition("\n")
        expr = re.search(r"^        expr: (.+)$", body, re.M)
        duration = re.search(r"^        for: (\S+)$", body, re.M)
        assert expr is not None, name
        out[name] = (expr.group(1), duration.group(1) if duration else None)
    return out


def summary(alert: str) -> str:
    """An alert's `summary` annotation, as a YAML (JSON) string for a rules test."""
    rule = ALERTS.read_text().split(f"\n      - alert: {alert}\n", 1)[1]
    m = re.search(r'^          summary: (".*")$', rule, re.M)
    assert m is not None, alert
    return m.group(1)


def test_the_rules_file_is_the_documented_table() -> None:
    documented = documented_alerts()
    assert len(documented) >= 19  # the table really parsed
    assert file_alerts() == documented


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"SUCCESS" in result.stdout


def test_the_certificate_alerts_fire_on_the_documented_days(tmp_path: Path) -> None:
    # time() starts at 0 in a rules test: a certificate expiring at 20 days (in seconds) is
    # 20 days away at 0, under 14 days away after day 6, and expired after day 20.
    day = 86400
    tests = f"""
rule_files: [{ALERTS}]
evaluation_interval: 1d
tests:
  - interval: 1d
    input_series:
      - series: 'pyrycode_relay_tls_certificate_not_after_seconds{{instance="r1"}}'
        values: '{20 * day}x30'
    alert_rule_test:
      - eval_time: 5d
        alertname: PyrycodeRelayCertificateExpiringSoon
        exp_alerts: []
      - eval_time: 7d
        alertname: PyrycodeRelayCertificateExpiringSoon
        exp_alerts:
          - exp_labels: {{severity: warning, instance: r1}}
            exp_annotations: {{summary: {summary("PyrycodeRelayCertificateExpiringSoon")}}}
      - eval_time: 19d
        alertname: PyrycodeRelayCertificateExpired
        exp_alerts: []
      - eval_time: 21d
        alertname: PyrycodeRelayCertificateExpiringSoon
        exp_alerts: []
      - eval_time: 20d
        alertname: PyrycodeRelayCertificateExpired
        exp_alerts:
          - exp_labels: {{severity: page, instance: r1}}
            exp_annotations: {{summary: {summary("PyrycodeRelayCertificateExpired")}}}
"""
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(tests)
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


async def test_promtool_finds_nothing_to_lint_in_a_live_scrape(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "relay", [DOMAIN])
    ctx = client_context(ca.pem)
    metrics_port = free_port()
    async with start_tls_relay(
        f"--tls-cert={cert}", f"--tls-key={key}", f"--metrics-listen=127.0.0.1:{metrics_port}"
    ) as relay:
        b = await tls_binary(relay.port, ctx, "lint")
        p = await tls_phone(relay.port, ctx, "lint")
        await p.close()
        async with asyncio.timeout(5):
            while relay.count_log("msg=ws_closed") < 1:
                await asyncio.sleep(0.02)
        status, _, body = await http_request(metrics_port, "GET", "/metrics")
        await b.close()
    assert status == 200
    assert b"pyrycode_relay_tls_certificate_not_after_seconds " in body
    assert b'pyrycode_relay_ws_connection_duration_seconds_count{endpoint="client"} 1.0' in body
    result = promtool("check", "metrics", stdin=body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == result.stderr == b""  # no lint, not even a warning
