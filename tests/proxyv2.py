"""PROXY protocol v2 headers as a front proxy sends them, for the tests (the relay only parses)."""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from pyrycode_relay.tls.proxy import (
    CMD_PROXY,
    FAM_INET,
    FAM_INET6,
    PROTO_STREAM,
    SIGNATURE,
    VERSION_2,
)

CMD_LOCAL: Final = 0x0


def build_proxy_v2(
    source: tuple[str, int], dest: tuple[str, int], *, command: int = CMD_PROXY, tlvs: bytes = b""
) -> bytes:
    """A v2 header for TCP over the addresses' family."""
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(dest[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    family = FAM_INET if src.version == 4 else FAM_INET6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], dest[1]) + tlvs
    return (
        SIGNATURE
        + bytes([VERSION_2 << 4 | command, family << 4 | PROTO_STREAM])
        + struct.pack("!H", len(body))
        + body
    )
