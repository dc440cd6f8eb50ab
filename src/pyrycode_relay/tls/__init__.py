"""TLS in the relay: the static-certificate and ACME modes, the PROXY v2 front, the Host gate.

Imported only when the relay terminates TLS itself (--domain or --tls-cert): insecure mode,
behind a TLS-terminating proxy, loads none of it and none of `cryptography` or `acme`.
"""
