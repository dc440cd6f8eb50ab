"""Which IP a request counts against (reference §8.4).

Owns: the choice between the TCP peer and the first X-Forwarded-For entry. Must never: parse or
normalise the address (no case change, zone ids kept, XFF taken unchecked when trusted), or
decide policy; the caller treats "" as "deny".
"""

from __future__ import annotations

# Go's strings.TrimSpace set (unicode.IsSpace); str.strip() would also eat \x1c-\x1f.
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + ("\u2028\u2029\u202f\u205f\u3000")
)


def client_ip(peer_host: str | None, xff: str | None, trust_xff: bool) -> str:
    """The client IP: the peer host, or with `trust_xff` the first XFF entry when non-empty.

    `peer_host` is the peer address with the port already removed (None or "" when unknown);
    `xff` is the first X-Forwarded-For header only.
    """
    if trust_xff and xff:
        first = xff.split(",", 1)[0].strip(_GO_SPACE)
        if first:
            return first
    return peer_host or ""
