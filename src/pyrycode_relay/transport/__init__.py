"""Byte-level I/O: HTTP request heads, the WebSocket connection adapter, listeners."""
