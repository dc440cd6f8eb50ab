"""The command line as an operator meets it, through the real console entry point: help on
stdout, one-line refusals in the chosen log format, conflicting modes named."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from pyrycode_relay import __version__
from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.spawn import relay_command, relay_env
from tests.certs import make_ca, write_leaf
from tests.e2e.clusterharness import redis_server


def run(*flags: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        relay_command(*flags),
        env=relay_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def insecure() -> str:
    return f"--insecure-listen=127.0.0.1:{free_port()}"


@pytest.mark.parametrize("flag", ["--help", "-h", "-help"])
def test_help_goes_to_stdout_and_exits_0(flag: str) -> None:
    done = run(flag)
    assert (done.returncode, done.stderr) == (0, "")
    text = done.stdout
    for needle in (
        "pyrycode-relay probe",
        "pyrycode-relay bench",
        "--check-config",
        "--tls-cert FILE --tls-key FILE",
        "PYRYCODE_RELAY_FCM_CREDENTIALS",
        "PYRYCODE_RELAY_PRODUCTION",
        "PYRYCODE_RELAY_SINGLE_INSTANCE",
        "NOTIFY_SOCKET",
        "--max-connections int",
    ):
        assert needle in text, needle


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--bogus"], "flag provided but not defined: --bogus"),
        (["-bogus=secret-value"], "flag provided but not defined: -bogus"),
        (["--max-connections=ten"], 'invalid value \\"ten\\" for flag --max-connections'),
        (["--domain"], "flag needs an argument: --domain"),
        (["serve"], 'unexpected argument \\"serve\\"'),
    ],
)
def test_bad_command_line_is_one_text_line(flags: list[str], reason: str) -> None:
    done = run(insecure(), *flags)
    assert (done.returncode, done.stdout) == (2, "")
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert " level=ERROR " in lines[0]
    assert 'msg="refusing to start: invalid command line"' in lines[0]
    assert reason in lines[0]
    assert lines[0].endswith('fix="see --help"')
    assert "secret-value" not in done.stderr


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        (["--log-format=json", "--bogus"], {}),
        (["--bogus"], {"PYRYCODE_RELAY_LOG_FORMAT": "json"}),
    ],
)
def test_bad_command_line_honours_json_log_format(flags: list[str], env: dict[str, str]) -> None:
    done = run(insecure(), *flags, env=env)
    assert (done.returncode, done.stdout) == (2, "")
    [line] = done.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert record["msg"] == "refusing to start: invalid command line"
    assert record["reason"] == "flag provided but not defined: --bogus"
    assert record["fix"] == "see --help"


def test_every_exit_2_has_the_same_shape_in_json() -> None:
    """A flag error and a boot refusal read alike: one JSON record with msg and fix."""
    flag_error = run("--log-format=json", "--grace-period=soon")
    boot_refusal = run("--log-format=json")  # no mode
    for done in (flag_error, boot_refusal):
        assert done.returncode == 2
        [line] = done.stderr.splitlines()
        record = json.loads(line)
        assert record["level"] == "ERROR"
        assert "fix" in record
    assert "--tls-cert" in json.loads(boot_refusal.stderr)["fix"]  # names the static mode


def test_insecure_with_domain_names_the_conflict() -> None:
    done = run(insecure(), "--domain=relay.example.org")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert "--insecure-listen is mutually exclusive with --domain" in line


# -- --check-config -------------------------------------------------------------------


def test_check_config_on_the_readme_command_prints_the_plan_and_binds_nothing() -> None:
    port, metrics = free_port(), free_port()
    # Both ports are taken: a start would fail to listen; a check never tries.
    with socket.create_server(("127.0.0.1", port)), socket.create_server(("127.0.0.1", metrics)):
        done = run(
            f"--insecure-listen=127.0.0.1:{port}",
            f"--metrics-listen=127.0.0.1:{metrics}",
            "--check-config",
        )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"configuration ok: pyrycode-relay {__version__} would serve"
    plan = dict(line.split(None, 1) for line in lines[1:] if not line.startswith("  rate"))
    assert plan["mode"] == "insecure"
    assert plan["listen"].startswith(f"127.0.0.1:{port} ")
    assert plan["metrics"].startswith(f"127.0.0.1:{metrics} ")
    assert plan["push"] == "off"


def test_check_config_static_certificate(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, serial = write_leaf(ca, tmp_path, "relay", ["relay.example.org"])
    done = run(f"--tls-cert={cert}", f"--tls-key={key}", "--check-config", "--log-format=json")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    plan = json.loads(done.stdout)
    assert (plan["config"], plan["mode"]) == ("ok", "static-tls")
    assert "relay.example.org" in plan["certificate"]
    assert int(plan["certificate"].split("serial ", 1)[1].split(";")[0], 16) == serial
    assert "days left" in plan["certificate"]


def test_check_config_expired_certificate_fails_and_a_foreign_domain_warns(
    tmp_path: Path,
) -> None:
    ca = make_ca()
    gone = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert, key, _ = write_leaf(ca, tmp_path, "old", ["relay.example.org"], not_after=gone)
    expired = run(f"--tls-cert={cert}", f"--tls-key={key}", "--check-config")
    assert (expired.returncode, expired.stdout) == (2, "")
    [line] = expired.stderr.splitlines()
    assert 'msg="check failed: tls certificate has expired"' in line
    cert, key, _ = write_leaf(ca, tmp_path, "new", ["relay.example.org"])
    other = run(
        f"--tls-cert={cert}", f"--tls-key={key}", "--domain=other.example.org", "--check-config"
    )
    assert other.returncode == 0
    [line] = other.stderr.splitlines()
    assert " level=WARN " in line
    assert 'msg="tls certificate does not name the domain"' in line
    wildcard, wkey, _ = write_leaf(ca, tmp_path, "wild", ["*.example.org"])
    covered = run(
        f"--tls-cert={wildcard}",
        f"--tls-key={wkey}",
        "--domain=relay.example.org",
        "--check-config",
    )
    assert (covered.returncode, covered.stderr) == (0, "")


def test_a_bad_acme_ca_bundle_is_refused_by_a_start_and_a_check(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    flags = (
        "--domain=relay.example.org",
        f"--cert-cache={tmp_path / 'certs'}",
        f"--https-listen=127.0.0.1:{free_port()}",
        f"--http-listen=127.0.0.1:{free_port()}",
        f"--acme-ca-bundle={bundle}",
        "--metrics-listen=",
    )
    for extra in ((), ("--check-config",)):
        done = run(*flags, *extra)
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.splitlines()
        assert 'msg="refusing to start: invalid --acme-ca-bundle"' in line
        assert "holds no PEM CA certificate" in line


def test_check_config_missing_certificate_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    done = run(f"--tls-cert={missing}", f"--tls-key={missing}", "--check-config")
    assert (done.returncode, done.stdout) == (2, "")
    [line] = done.stderr.splitlines()
    assert 'msg="refusing to start: invalid TLS certificate"' in line


def test_check_config_mismatched_key_is_refused(tmp_path: Path) -> None:
    ca = make_ca()
    cert, _, _ = write_leaf(ca, tmp_path, "one", ["relay.example.org"])
    _, other_key, _ = write_leaf(ca, tmp_path, "two", ["relay.example.org"])
    done = run(f"--tls-cert={cert}", f"--tls-key={other_key}", "--check-config")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1


def test_check_config_acme_creates_no_cache_directory(tmp_path: Path) -> None:
    cache = tmp_path / "state" / "certs"
    done = run("--domain=relay.example.org", f"--cert-cache={cache}", "--check-config")
    assert done.returncode == 0, done.stderr
    assert "will be created 0700" in done.stdout
    assert not cache.exists() and not cache.parent.exists()


def test_check_config_cache_that_is_a_file_exits_1_like_a_start(tmp_path: Path) -> None:
    cache = tmp_path / "certs"
    cache.write_text("")
    done = run("--domain=relay.example.org", f"--cert-cache={cache}", "--check-config")
    assert done.returncode == 1
    assert "not a directory" in done.stderr


async def test_check_config_cluster_reaches_redis_and_never_prints_its_password() -> None:
    def check(url: str) -> subprocess.CompletedProcess[str]:
        return run(insecure(), f"--cluster-redis={url}", "--check-config")

    async with redis_server() as redis:
        ok = await asyncio.to_thread(check, redis.url)
        assert ok.returncode == 0, ok.stderr
        assert "reachable (Redis 7." in ok.stdout
        # A user whose password is not the one given: AUTH fails; the refusal must not echo it.
        await redis.command("ACL", "SETUSER", "relay", "on", ">the-right-one", "~*", "+@all")
        bad = await asyncio.to_thread(check, redis.url.replace("//", "//relay:hunter2-secret@"))
        assert bad.returncode == 2, bad.stdout
        assert "hunter2-secret" not in bad.stdout + bad.stderr
        [line] = bad.stderr.splitlines()
        assert 'msg="check failed: redis refused the credentials"' in line
        # An --instance-id a live process holds: a start would wait, then refuse.
        await redis.command("SET", "pyrycode-relay:instance:i9", "p.1", "PX", "60000")
        held = await asyncio.to_thread(
            run, insecure(), f"--cluster-redis={redis.url}", "--instance-id=i9", "--check-config"
        )
        assert held.returncode == 2
        [line] = held.stderr.splitlines()
        assert 'msg="refusing to start: instance id already live in the cluster"' in line
        await redis.stop()
        down = await asyncio.to_thread(check, redis.url)
    assert down.returncode == 2
    [line] = down.stderr.splitlines()
    assert 'msg="check failed: redis unreachable"' in line
