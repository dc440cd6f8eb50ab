"""Cert cache directory policy (reference §10) on the real filesystem."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pyrycode_relay.tls.certcache import (
    REASON_INSECURE,
    REASON_NOT_DIR,
    CertCacheRefusal,
    Tightened,
    prepare_cert_cache,
)

ME = os.geteuid()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_missing_directory_is_created_private(tmp_path: Path) -> None:
    target = tmp_path / "a" / "certs"
    assert prepare_cert_cache(str(target), euid=ME, platform="linux") is None
    assert target.is_dir()
    assert mode(target) == 0o700


def test_private_directory_is_used_as_is(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    assert prepare_cert_cache(str(tmp_path), euid=ME, platform="linux") is None
    assert mode(tmp_path) == 0o700


def test_own_open_directory_is_tightened(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    result = prepare_cert_cache(str(tmp_path), euid=ME, platform="linux")
    assert result == Tightened(str(tmp_path), "0755", "0700")
    assert mode(tmp_path) == 0o700


def test_someone_elses_open_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o750)
    with pytest.raises(CertCacheRefusal, match=r"\(must be 0700\)"):
        prepare_cert_cache(str(tmp_path), euid=ME + 1, platform="linux")
    assert mode(tmp_path) == 0o750


def test_open_directory_with_unknown_owner_semantics_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with pytest.raises(CertCacheRefusal) as exc:
        prepare_cert_cache(str(tmp_path), euid=ME, platform="darwin")
    assert str(exc.value) == REASON_INSECURE


def test_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "certs"
    target.write_text("x")
    with pytest.raises(CertCacheRefusal) as exc:
        prepare_cert_cache(str(target), euid=ME, platform="linux")
    assert str(exc.value) == REASON_NOT_DIR
