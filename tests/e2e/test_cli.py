"""The command line as an operator meets it, through the real console entry point: help on
stdout, one-line refusals in the chosen log format, conflicting modes named."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping

import pytest

from pyrycode_relay.tools.bench.ports import free_port
from pyrycode_relay.tools.bench.spawn import relay_command, relay_env


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
