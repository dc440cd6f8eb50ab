"""Pure pieces of the TLS modes: Host parsing, the renewal rule, context settings, loading."""

from __future__ import annotations

import datetime as dt
import re
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pyrycode_relay.tls.acme import renew_at
from pyrycode_relay.tls.certs import CertificateError, CertSwitch, load_pair, serial_hex
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


def _broken(tmp_path: Path, case: str) -> tuple[str, str, str]:
    """(cert path, key path, the words the error must contain) for one broken pair."""
    ca = make_ca()
    cert, key, _ = write_leaf(ca, tmp_path, "r", ["relay.example"])
    leaf_pem, key_pem = cert.read_bytes(), key.read_bytes()
    if case == "cert missing":
        cert.unlink()
        return str(cert), str(key), f"certificate file {cert}: No such file or directory"
    if case == "key missing":
        key.unlink()
        return str(cert), str(key), f"key file {key}: No such file or directory"
    if case == "cert empty":
        cert.write_bytes(b"\n")
        return str(cert), str(key), f"certificate file {cert} is empty"
    if case == "cert garbage":
        cert.write_bytes(b"garbage\n")
        return str(cert), str(key), f"certificate file {cert} holds no PEM certificate"
    if case == "cert malformed":
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        return str(cert), str(key), f"certificate file {cert}: a PEM certificate in it is malformed"
    if case == "swapped":
        return str(key), str(cert), "holds a private key, not a certificate (are --tls-cert and"
    if case == "cert in key file":
        key.write_bytes(leaf_pem)
        return str(cert), str(key), f"key file {key} holds a certificate, not a private key"
    if case == "key garbage":
        key.write_bytes(b"garbage\n")
        return str(cert), str(key), f"key file {key} holds no PEM private key"
    if case == "key malformed":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        return str(cert), str(key), f"key file {key}: its PEM private key is malformed"
    if case == "key encrypted":
        loaded = serialization.load_pem_private_key(key_pem, password=None)
        key.write_bytes(
            loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pass"),
            )
        )
        return str(cert), str(key), f"key file {key}: the key is encrypted"
    if case == "mismatch":
        other = ec.generate_private_key(ec.SECP256R1())
        key.write_bytes(
            other.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(cert), str(key), "certificate and key do not match"
    assert case == "leaf not first"
    cert.write_bytes(ca.pem + leaf_pem)
    return (
        str(cert),
        str(key),
        (
            f"certificate and key do not match: the key belongs to a later certificate in {cert};"
            " the server's own certificate must come first"
        ),
    )


@pytest.mark.parametrize(
    "case",
    [
        "cert missing",
        "key missing",
        "cert empty",
        "cert garbage",
        "cert malformed",
        "swapped",
        "cert in key file",
        "key garbage",
        "key malformed",
        "key encrypted",
        "mismatch",
        "leaf not first",
    ],
)
def test_loading_errors_say_what_is_wrong_in_plain_words(tmp_path: Path, case: str) -> None:
    cert, key, words = _broken(tmp_path, case)
    with pytest.raises(CertificateError) as info:
        load_pair(cert, key)
    text = str(info.value)
    assert words in text
    assert "\n" not in text and "BEGIN" not in text, text
    assert not re.search(r"[A-Z]+_[A-Z_]+", text), "an OpenSSL code instead of words"


@pytest.mark.parametrize(
    ("serial", "text"),
    [
        (0, "00"),
        (0xA, "0A"),
        (0xFF, "FF"),
        (0x100, "0100"),
        (0x0A1B2C, "0A1B2C"),
        (2**159, "80" + "00" * 19),
    ],
)
def test_serials_print_as_openssl_x509_serial_does(serial: int, text: str) -> None:
    assert serial_hex(serial) == text
