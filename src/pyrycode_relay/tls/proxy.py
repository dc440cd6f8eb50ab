"""The PROXY protocol v2 header (haproxy's proxy-protocol.txt §2.2), parsed from bytes.

Owns: deciding whether a byte prefix is a complete, acceptable v2 header and exactly how
many bytes it occupies, so the caller can read that many bytes and not one more (what
follows belongs to the TLS ClientHello). Accepted: version 2, command PROXY, TCP over
IPv4 or IPv6 — the only shape Fly's edge sends (reference §8.5). Refused: v1 text
headers, LOCAL, UNSPEC, UDP, unix sockets, a bad signature, a length too short for its
addresses. TLVs after the addresses are skipped unread (their bytes are still consumed).
Also the `--proxy-protocol-allow` CIDR list and the check of a socket peer against it.
Must never: do I/O, or return a header before every byte of it has arrived.

Hand-written because the few Python libraries for this either read from a socket
themselves or parse v1 too; this is 60 lines of struct unpacking.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pyrycode_relay.core.addresses import Network

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_LEN: Final = 16  # signature (12) + ver/cmd + fam/proto + 2-byte length

VERSION_2: Final = 0x2
CMD_PROXY: Final = 0x1
FAM_INET: Final = 0x1
FAM_INET6: Final = 0x2
PROTO_STREAM: Final = 0x1

_ADDR_LEN: Final = {FAM_INET: 12, FAM_INET6: 36}


def peer_allowed(host: str, allow: Sequence[Network]) -> bool:
    if not allow:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers this way
    return any(ip in net for net in allow)


class ProxyError(Exception):
    """The bytes are not an acceptable PROXY v2 header; the connection must be dropped."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    source_host: str  # the real client's IP address, in ipaddress's canonical text
    source_port: int
    dest_host: str
    dest_port: int
    length: int  # bytes the header occupies on the wire; exactly these are consumed


def needed(buf: bytes) -> int:
    """How many bytes the header in `buf` occupies, as far as `buf` tells: FIXED_LEN
    until the fixed part is there, then the full length. A reader that asks the socket
    for `needed(buf) - len(buf)` bytes never reads past the header."""
    if len(buf) < FIXED_LEN:
        return FIXED_LEN
    return FIXED_LEN + int.from_bytes(buf[14:16], "big")


def parse_proxy_v2(buf: bytes) -> ProxyHeader | None:
    """The header at the start of `buf`, None while more bytes are needed; raises
    ProxyError as soon as the bytes so far cannot be an acceptable header. Bytes in `buf`
    beyond the header are ignored (the caller should never have read them)."""
    prefix = buf[: len(SIGNATURE)]
    if prefix != SIGNATURE[: len(prefix)]:
        raise ProxyError("not a PROXY v2 signature")
    if len(buf) < 13:
        return None
    version, command = buf[12] >> 4, buf[12] & 0x0F
    if version != VERSION_2:
        raise ProxyError("unsupported PROXY version")
    if command != CMD_PROXY:
        raise ProxyError("PROXY command is not PROXY (LOCAL or unknown)")
    if len(buf) < 14:
        return None
    family, protocol = buf[13] >> 4, buf[13] & 0x0F
    addr_len = _ADDR_LEN.get(family)
    if addr_len is None or protocol != PROTO_STREAM:
        raise ProxyError("PROXY address family is not TCP over IPv4/IPv6")
    if len(buf) < FIXED_LEN:
        return None
    length = int.from_bytes(buf[14:16], "big")
    if length < addr_len:
        raise ProxyError("PROXY header too short for its addresses")
    total = FIXED_LEN + length
    if len(buf) < total:
        return None
    addrs = buf[FIXED_LEN : FIXED_LEN + addr_len]
    if family == FAM_INET:
        src, dst, sport, dport = struct.unpack("!4s4sHH", addrs)
        return ProxyHeader(
            str(ipaddress.IPv4Address(src)), sport, str(ipaddress.IPv4Address(dst)), dport, total
        )
    src, dst, sport, dport = struct.unpack("!16s16sHH", addrs)
    return ProxyHeader(
        str(ipaddress.IPv6Address(src)), sport, str(ipaddress.IPv6Address(dst)), dport, total
    )
