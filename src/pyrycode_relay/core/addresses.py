"""Listener addresses and address allowlists, parsed once from their flags' text.

Owns: `ListenAddress` (Go's net.SplitHostPort rules, a decimal port 1..65535, the loopback
literal test the metrics listener needs), `parse_networks` (a comma-separated CIDR list), and
`Listeners`: what one validated configuration binds, built by the boot checks and handed to
the server. Must never: resolve a name, bind, or echo more of a refused value than a flag's
own text.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """`[host]:port`; host "" means every interface, IPv6 brackets are stripped."""

    text: str  # as given, for logs
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Raises ValueError with a one-line `relay: ...` reason. Port 0 is refused: it
        would bind an ephemeral port nobody expects."""
        if text == "":
            raise ValueError("relay: listener address is empty")
        try:
            host, port_text = _split_host_port(text)
        except ValueError as exc:
            raise ValueError(f"relay: parsing listener address: {exc}") from None
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError("relay: parsing listener address: port is not a decimal number")
        port = int(port_text)
        if port == 0:
            raise ValueError("relay: parsing listener address: port 0 is not permitted")
        if port > 65535:
            raise ValueError("relay: parsing listener address: port out of range")
        return cls(text, host, port)

    @property
    def is_loopback_literal(self) -> bool:
        """A loopback IP literal (127.0.0.0/8, ::1). Hostnames, even `localhost`, are not:
        a name resolves again at bind time, so a check on it would be a TOCTOU race."""
        if "%" in self.host:  # a zone index is never loopback, and Go's ParseIP refuses it
            return False
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.is_loopback
        return ip.is_loopback

    def __str__(self) -> str:
        return self.text


def _split_host_port(value: str) -> tuple[str, str]:
    """Go's net.SplitHostPort: `host:port`, `[v6]:port`, `:port`; brackets stripped."""
    i = value.rfind(":")
    if i < 0:
        raise ValueError("missing port in address")
    j = k = 0
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("missing ']' in address")
        if end + 1 == len(value):
            raise ValueError("missing port in address")
        if end + 1 != i:
            if value[end + 1] == ":":
                raise ValueError("too many colons in address")
            raise ValueError("missing port in address")
        host = value[1:end]
        j, k = 1, end + 1
    else:
        host = value[:i]
        if ":" in host:
            raise ValueError("too many colons in address")
    if "[" in value[j:]:
        raise ValueError("unexpected '[' in address")
    if "]" in value[k:]:
        raise ValueError("unexpected ']' in address")
    return host, value[i + 1 :]


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (or bare IPs); ValueError naming the entry that does not parse.
    Empty text: no networks."""
    nets: list[Network] = []
    for part in text.split(","):
        entry = part.strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"not a CIDR: {entry!r}") from None
    return tuple(nets)


@dataclass(frozen=True, slots=True)
class Listeners:
    """What a validated configuration binds."""

    main: ListenAddress  # --insecure-listen, or --https-listen in a TLS mode
    acme: ListenAddress | None  # --http-listen, ACME mode only
    metrics: ListenAddress | None  # --metrics-listen; None: disabled
    proxy_allow: tuple[Network, ...]  # --proxy-protocol-allow; empty: any peer
