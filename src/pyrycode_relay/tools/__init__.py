"""Tooling that runs beside the relay: `pyrycode-relay probe` and `pyrycode-relay bench`.

Owns: checking a running relay from outside (`probe.py`) and measuring relays it starts or is
given (`bench/`: load, soak and memory figures).
Must never: be imported by serving code; only `pyrycode_relay.cli` reaches in here, lazily,
when the first argument names a tool.
"""
