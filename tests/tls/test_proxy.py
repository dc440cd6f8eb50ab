"""The PROXY v2 parser: accepted shapes, every refusal, exact lengths, and fuzzing."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrycode_relay.tls.proxy import (
    FIXED_LEN,
    SIGNATURE,
    ProxyError,
    ProxyHeader,
    needed,
    parse_proxy_v2,
)
from tests.proxyv2 import CMD_LOCAL, build_proxy_v2

CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def test_ipv4_header_with_trailing_bytes_consumes_exactly_the_header() -> None:
    raw = build_proxy_v2(("203.0.113.7", 51234), ("10.0.0.1", 443))
    header = parse_proxy_v2(raw + CLIENT_HELLO)
    assert header == ProxyHeader("203.0.113.7", 51234, "10.0.0.1", 443, len(raw))
    assert len(raw) == FIXED_LEN + 12


def test_ipv6_header_and_tlvs_are_skipped_but_counted() -> None:
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP with three bytes
    raw = build_proxy_v2(("2001:db8::1", 40000), ("2001:db8::2", 8443), tlvs=tlv)
    header = parse_proxy_v2(raw + CLIENT_HELLO)
    assert header == ProxyHeader("2001:db8::1", 40000, "2001:db8::2", 8443, len(raw))
    assert len(raw) == FIXED_LEN + 36 + len(tlv)


def _with(raw: bytes, index: int, value: int) -> bytes:
    return raw[:index] + bytes([value]) + raw[index + 1 :]


V4 = build_proxy_v2(("192.0.2.5", 1), ("192.0.2.6", 2))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"PROXY TCP4 192.0.2.5 192.0.2.6 1 2\r\n", "v1 text header"),
        (b"GET / HTTP/1.1\r\n\r\n", "plain HTTP"),
        (CLIENT_HELLO, "a bare ClientHello"),
        (_with(V4, 12, 0x20 | CMD_LOCAL), "LOCAL command"),
        (_with(V4, 12, 0x22), "unknown command"),
        (_with(V4, 12, 0x11), "version 1 in the binary format"),
        (_with(V4, 13, 0x01), "UNSPEC family"),
        (_with(V4, 13, 0x12), "UDP over IPv4"),
        (_with(V4, 13, 0x31), "unix socket"),
        (V4[:14] + struct.pack("!H", 11) + V4[16:27], "length shorter than the addresses"),
        (_with(V4, 3, 0x00), "broken signature"),
    ],
)
def test_refusals(raw: bytes, why: str) -> None:
    with pytest.raises(ProxyError):
        parse_proxy_v2(raw)


def test_local_is_refused_as_soon_as_its_command_byte_arrives() -> None:
    with pytest.raises(ProxyError):
        parse_proxy_v2(SIGNATURE + bytes([0x20]))


def test_needed_grows_from_the_fixed_part_to_the_whole_header() -> None:
    assert needed(b"") == FIXED_LEN
    assert needed(V4[:10]) == FIXED_LEN
    assert needed(V4[:FIXED_LEN]) == len(V4)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_proxy_error(data: bytes) -> None:
    try:
        result = parse_proxy_v2(data)
    except ProxyError:
        return
    assert result is None or result.length <= len(data)


@given(st.binary(max_size=80))
def test_arbitrary_bytes_after_a_signature_raise_only_proxy_error(data: bytes) -> None:
    try:
        result = parse_proxy_v2(SIGNATURE + data)
    except ProxyError:
        return
    assert result is None or result.length <= len(SIGNATURE) + len(data)


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int], tuple[str, int]]:
    addr = ipv4 if draw(st.booleans()) else ipv6
    src = (draw(addr), draw(ports))
    dst = (draw(addr), draw(ports))
    tlvs = draw(st.binary(max_size=40))
    return build_proxy_v2(src, dst, tlvs=tlvs), src, dst


@given(headers(), st.binary(max_size=40))
def test_valid_headers_round_trip_exactly(
    case: tuple[bytes, tuple[str, int], tuple[str, int]], trailing: bytes
) -> None:
    raw, src, dst = case
    header = parse_proxy_v2(raw + trailing)
    assert header == ProxyHeader(src[0], src[1], dst[0], dst[1], len(raw))


@given(headers(), st.data())
def test_every_proper_prefix_needs_more(
    case: tuple[bytes, tuple[str, int], tuple[str, int]], data: st.DataObject
) -> None:
    raw = case[0]
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse_proxy_v2(raw[:cut]) is None
    assert needed(raw[:cut]) > cut
