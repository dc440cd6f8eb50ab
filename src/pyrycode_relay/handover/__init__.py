"""Live handover: a successor process takes over the listeners and every live WebSocket.

`state` is the versioned blob, `channel` the Unix socket that carries it with the
descriptors, `snapshot` what a process's relay and connections turn into (and back), `giver`
the old process's side and `taker` the successor's. The design is in
docs/decisions/0018-live-handover.md.
"""
