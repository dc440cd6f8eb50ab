"""The committed locks (requirements/*.lock) agree with pyproject.toml's ranges.

scripts/lock.sh writes them; these checks catch a range edited without re-locking, a lock
edited by hand, or a range with no upper bound (which would claim versions no suite ran on)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
REQS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements_in(path: Path) -> list[Requirement]:
    return [
        Requirement(line)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def direct(*extras: str, build: bool = True, editable: bool = False) -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    if build:
        reqs += requirements_in(REQS / "build.in")
    if editable:
        reqs += requirements_in(REQS / "editable.in")
    return reqs


def pins(lock: str) -> dict[str, Version]:
    """name -> version of every package in a lock; each must carry its hashes."""
    text = (REQS / lock).read_text()
    found = re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}.*\n)+)", text, re.M
    )
    names = re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.M)
    assert len(found) == len(names), f"{lock}: a pin without hashes"
    return {canonicalize_name(name): Version(version) for name, version, _ in found}


def floor(req: Requirement) -> Version:
    (bound,) = [s.version for s in req.specifier if s.operator in (">=", "==")]
    return Version(bound)


TEST = direct("fast", "test", editable=True)


def test_every_range_is_bounded_on_both_sides() -> None:
    for req in TEST:
        operators = {s.operator for s in req.specifier}
        assert operators in ({">=", "<"}, {"=="}), f"{req}: want >=low,<high or ==exact"


def test_the_build_requirement_is_locked_as_declared() -> None:
    (hatchling,) = requirements_in(REQS / "build.in")
    assert [Requirement(r) for r in PYPROJECT["build-system"]["requires"]] == [hatchling]


def test_locked_versions_are_inside_the_ranges() -> None:
    locked = pins("test.lock")
    for req in TEST:
        assert locked[canonicalize_name(req.name)] in req.specifier, req


def test_lowest_lock_holds_every_direct_dependency_at_its_floor() -> None:
    lowest = pins("lowest.lock")
    for req in TEST:
        assert lowest[canonicalize_name(req.name)] == floor(req), req


def test_runtime_and_build_locks_are_parts_of_the_test_lock() -> None:
    test = pins("test.lock")
    runtime, build = pins("runtime.lock"), pins("build.lock")
    for part in (runtime, build):
        assert {name: test[name] for name in part} == part
    for req in direct("fast", build=False):
        assert canonicalize_name(req.name) in runtime, req
    tools = direct("test", build=False)[len(direct(build=False)) :]
    for req in [*tools, *requirements_in(REQS / "build.in")]:
        assert canonicalize_name(req.name) not in runtime, f"{req} in the runtime lock"
    (hatchling,) = requirements_in(REQS / "build.in")
    assert canonicalize_name(hatchling.name) in build
