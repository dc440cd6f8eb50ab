"""Pure pieces of the TLS modes: Host parsing, the renewal rule, context settings, loading."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest

from pyrycode_relay.tls.acme import renew_at
from pyrycode_relay.tls.certs import CertificateError, CertSwitch, load_pair
from pyrycode_relay.tls.routes import host_without_port
from tests.certs import make_ca, write_leaf


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Relay.Example:443", "relay.example"),
        ("relay.example", "relay.example"),
        ("relay.example.", "relay.example"),
        ("[::1]:8443", "::1"),
        ("", ""),
    ],
)
def test_host_without_port(host: str, expected: str) -> None:
    assert host_without_port(host) == expected


def test_renewal_when_a_third_of_the_lifetime_is_left() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert renew_at(start, start + dt.timedelta(days=90)) == start + dt.timedelta(days=60)


def test_contexts_refuse_anything_older_than_tls_1_2_and_speak_http_1_1(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, serial = write_leaf(ca, tmp_path, "r", ["relay.example"])
    loaded = load_pair(str(cert), str(key))
    assert loaded.serial == serial and loaded.names == ("relay.example",)
    switch = CertSwitch("relay.example")
    for ctx in (switch.front, loaded.context):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2


def test_loading_errors_are_one_line_without_key_material(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "r", ["relay.example"])
    secret = key.read_text()
    cert.write_text(secret)  # a key where the certificate should be
    with pytest.raises(CertificateError) as info:
        load_pair(str(cert), str(key))
    assert "\n" not in str(info.value) and "PRIVATE" not in str(info.value)
