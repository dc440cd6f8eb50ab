from __future__ import annotations

import pytest

from pyrycode_relay.core.clientip import client_ip


@pytest.mark.parametrize(
    ("peer", "xff", "trust", "want"),
    [
        # default: the peer host, XFF ignored completely
        ("192.0.2.5", None, False, "192.0.2.5"),
        ("2001:db8::1", None, False, "2001:db8::1"),
        ("::1", None, False, "::1"),
        ("FE80::1%eth0", None, False, "FE80::1%eth0"),  # no normalisation
        ("192.0.2.5", "203.0.113.7", False, "192.0.2.5"),
        (None, "203.0.113.7", False, ""),
        ("", None, False, ""),
        # trusted XFF: first entry up to the comma, trimmed, unchecked
        ("192.0.2.5", "203.0.113.7, 192.0.2.10", True, "203.0.113.7"),
        ("192.0.2.5", "  203.0.113.7  ", True, "203.0.113.7"),
        ("192.0.2.5", "not-an-ip", True, "not-an-ip"),
        ("192.0.2.5", "   , 198.51.100.4", True, "192.0.2.5"),
        ("192.0.2.5", "", True, "192.0.2.5"),
        ("192.0.2.5", None, True, "192.0.2.5"),
        (None, "   ", True, ""),
        (None, "203.0.113.7", True, "203.0.113.7"),
        # trimmed like Go's strings.TrimSpace: Unicode spaces go, \x1c (not a Go space) stays
        ("192.0.2.5", "\u00a0203.0.113.7\u3000", True, "203.0.113.7"),
        ("192.0.2.5", "\x1c203.0.113.7", True, "\x1c203.0.113.7"),
    ],
)
def test_client_ip(peer: str | None, xff: str | None, trust: bool, want: str) -> None:
    assert client_ip(peer, xff, trust) == want
