"""The deployment files: Dockerfile, .dockerignore, systemd unit, fly.toml.

There is no Docker engine in CI, so the Dockerfile is linted (hadolint) and its invariants are
checked here; its install step must be the README's (one install path, not two), and its
HEALTHCHECK command is run for real against a relay. The systemd unit is verified and rated by
`systemd-analyze`; the command lines in the unit and in fly.toml must parse with the relay's own
flag parser. scripts/test.sh installs hadolint (test extra) and systemd-analyze."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pyrycode_relay.core.config import Config, parse_args
from pyrycode_relay.tools.bench.ports import free_port
from tests.e2e.harness import run_command, start_relay

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "deploy" / "pyrycode-relay.service"
FLY = ROOT / "deploy" / "fly.toml"

Instruction = tuple[str, str]  # (KEYWORD, arguments)


def tool(name: str) -> str:
    """A CLI tool from the venv or PATH; missing fails in CI, skips on a developer machine."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing; scripts/test.sh must install it")
        pytest.skip(f"{name} not installed (scripts/test.sh installs it)")
    return found


def instructions(text: str) -> list[Instruction]:
    """Dockerfile logical lines (continuations joined, comments dropped) as (KEYWORD, args)."""
    out: list[Instruction] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def stages(instrs: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for keyword, args in instrs:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def dockerfile() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def arg_default(instrs: list[Instruction], name: str) -> str:
    for keyword, args in instrs:
        if keyword == "ARG" and args.startswith(name + "="):
            return args.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}")


def env_value(stage: list[Instruction], name: str) -> str:
    for keyword, args in stage:
        if keyword == "ENV":
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                if sep and key == name:
                    return value
    raise AssertionError(f"no ENV {name}")


def pip_install_targets(command: str) -> list[list[str]]:
    """The package arguments of every `pip install` in a shell command line (up to the next
    shell operator or the quote that closes an `sh -c "..."`)."""
    return [
        [w for w in shlex.split(m.group(1)) if not w.startswith("-")]
        for m in re.finditer(r"\bpip install\b([^&;|\n\"]*)", command)
    ]


def readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_base_images_are_pinned() -> None:
    instrs = dockerfile()
    image = arg_default(instrs, "PYTHON_IMAGE")
    # An exact patch release of 3.11 on slim bookworm, and the digest that makes it immutable.
    assert re.fullmatch(r"python:3\.11\.[0-9]+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    froms = [args for keyword, args in instrs if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    for args in froms:
        assert args.split()[0] == "${PYTHON_IMAGE}", f"unpinned base image: {args}"


def test_dockerfile_runtime_stage_invariants() -> None:
    all_stages = stages(dockerfile())
    build, runtime = all_stages[0], all_stages[-1]
    keywords = [k for k, _ in runtime]
    # Non-root, numeric (so Kubernetes' runAsNonRoot can verify it), and no RUN after it.
    users = [args for k, args in runtime if k == "USER"]
    assert users == ["65532:65532"]
    assert "RUN" not in keywords[keywords.index("USER") :]
    # No build tools, package installs or pip in the final image.
    for k, args in runtime:
        if k == "RUN":
            assert not re.search(r"apt-get|apk |gcc|build-essential|make ", args), args
            assert pip_install_targets(args) == [], args
            assert "pip uninstall" in args  # the base image's pip goes
    assert any(k == "RUN" and "pip uninstall --yes --quiet pip" in a for k, a in build)
    copies = [args for k, args in runtime if k == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "only the built venv is copied in"
    assert [args.split() for k, args in runtime if k == "EXPOSE"] == [["80", "443"]]
    cert_cache = env_value(runtime, "PYRYCODE_RELAY_CERT_CACHE")
    volumes = [json.loads(args) for k, args in runtime if k == "VOLUME"]
    assert volumes == [[cert_cache]]
    health = [args for k, args in runtime if k == "HEALTHCHECK"]
    assert len(health) == 1 and " CMD [" in health[0]
    assert [json.loads(args) for k, args in runtime if k == "ENTRYPOINT"] == [["pyrycode-relay"]]


def install_commands(text: str) -> list[list[str]]:
    """The arguments of every `scripts/install.sh` call in a shell text."""
    return [shlex.split(m[1]) for m in re.finditer(r"\bscripts/install\.sh\b([^&;|\n\"]*)", text)]


def test_dockerfile_readme_and_operations_share_one_install_command() -> None:
    runs = [args for k, args in dockerfile() if k == "RUN"]
    assert [t for run in runs for t in pip_install_targets(run)] == [], "only install.sh"
    assert [c for run in runs for c in install_commands(run)] == [
        ["/opt/venv", "requirements/runtime.lock"]
    ]
    setup = readme_setup_commands()
    assert len(setup) == 2, "the README keeps exactly two set-up commands"
    assert [c for block in setup for c in install_commands(block)] == [[".venv"]]
    ops = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", ops, re.S)
    assert all(pip_install_targets(block) == [] for block in blocks + setup)
    assert [c for block in blocks for c in install_commands(block)] == [[".venv"], [".venv"]]
    # install.sh's default lock is the runtime one the image names.
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert '"${2:-$root/requirements/runtime.lock}"' in script


def healthcheck_argv() -> list[str]:
    (args,) = [a for k, a in stages(dockerfile())[-1] if k == "HEALTHCHECK"]
    argv: list[str] = json.loads(args.split(" CMD ", 1)[1])
    assert argv[0] == "python3"
    return [sys.executable, *argv[1:]]


async def test_healthcheck_command_passes_against_a_live_relay_only() -> None:
    argv = healthcheck_argv()
    async with start_relay() as relay:
        env = {"PYRYCODE_RELAY_METRICS_LISTEN": f"127.0.0.1:{relay.metrics_port}"}
        code, out = await run_command(argv, env)
        assert code == 0, out
        assert (await relay.metrics())['promhttp_metric_handler_requests_total{code="200"}'] >= 1
    code, _ = await run_command(argv, {"PYRYCODE_RELAY_METRICS_LISTEN": f"127.0.0.1:{free_port()}"})
    assert code != 0


def test_dockerignore_is_an_allowlist() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "exclude everything (.git, .venv, secrets) and allow what is needed"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for k, args in dockerfile():
        if k == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source in allowed, f"COPY {source} is excluded by .dockerignore"


def unit_entries() -> list[tuple[str, str]]:
    entries = []
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.append((key, value))
    return entries


def parse_command(argv: list[str]) -> Config:
    assert argv[0].endswith("pyrycode-relay")
    return parse_args(argv[1:], {"HOME": "/nonexistent"})


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    entries = unit_entries()
    values = dict(entries)
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "Restart": "on-failure",
        "StateDirectory": "pyrycode-relay",
        "StateDirectoryMode": "0700",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        # Readiness and reload as the relay speaks them (tests/e2e/test_readiness.py); a
        # live handover's successor notifies before it is the main process.
        "Type": "notify",
        "NotifyAccess": "all",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }.items():
        assert values.get(key) == value, key
    config = parse_command(shlex.split(values["ExecStart"].replace("%S", "/var/lib")))
    # The capability is there only because the shipped command binds ports below 1024.
    assert config.domain and not config.insecure_listen
    assert int(config.https_listen.rsplit(":", 1)[1]) < 1024
    assert config.cert_cache.startswith("/var/lib/pyrycode-relay/")
    # The drain must finish before systemd escalates to SIGKILL.
    assert float(values["TimeoutStopSec"].removesuffix("s")) > config.drain_timeout

    analyze = tool("systemd-analyze")
    unit = tmp_path / "pyrycode-relay.service"
    relay_bin = Path(sys.executable).parent / "pyrycode-relay"
    unit.write_text(
        UNIT.read_text().replace("/opt/pyrycode-relay/.venv/bin/pyrycode-relay", str(relay_bin))
    )
    for argv in (
        [analyze, "verify", str(unit)],
        # Exposure 0.0 (locked down) .. 10.0 (unprotected), in tenths: keep it at 2.0 or below.
        [analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_fly_toml_mirrors_the_reference_deploy_shape() -> None:
    fly = tomllib.loads(FLY.read_text())
    assert fly["env"]["PYRYCODE_RELAY_SINGLE_INSTANCE"] == "1"
    assert fly["kill_signal"] == "SIGTERM"
    config = parse_command(["pyrycode-relay", *shlex.split(fly["processes"]["app"])])
    assert config.domain and config.https_proxy_protocol
    https_port = int(config.https_listen.rsplit(":", 1)[1])
    http_port = int(config.http_listen.rsplit(":", 1)[1])
    assert fly["kill_timeout"] > config.drain_timeout
    by_port = {s["internal_port"]: s for s in fly["services"]}
    assert set(by_port) == {https_port, http_port}
    for service in fly["services"]:
        assert service["protocol"] == "tcp"  # raw TCP: the relay terminates TLS itself
        assert service["min_machines_running"] == 1
        assert service["auto_stop_machines"] == "off"
    tls = by_port[https_port]
    # Fly's proxy_proto handler on 443 exactly when the relay expects a PROXY v2 header.
    assert tls["ports"] == [
        {"port": 443, "handlers": ["proxy_proto"], "proxy_proto_options": {"version": "v2"}}
    ]
    acme = by_port[http_port]
    assert acme["ports"] == [{"port": 80}]
    assert acme["tcp_checks"] and "http_checks" not in acme
    runtime = stages(dockerfile())[-1]
    assert [m["destination"] for m in fly["mounts"]] == [
        env_value(runtime, "PYRYCODE_RELAY_CERT_CACHE")
    ]
    assert fly["vm"] == [{"size": "shared-cpu-1x", "memory": "256mb"}]
