"""The process's exit codes and the one way start-up is refused.

Owns: `ExitCode` (the reference's: 0 clean, 1 runtime or listener failure, 2 configuration
refused) and `Refusal`: a log event name, its allowlisted fields and an exit code, raised where
a check fails and logged exactly once, by whoever ends the process (`cli`, `RelayServer`).
Must never: log (the catcher does), or carry a key outside the log allowlist.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from pyrycode_relay.ops.log import ALLOWED_KEYS, Logger


class ExitCode(enum.IntEnum):
    OK = 0
    RUNTIME = 1  # a listener failed, the cert cache is unusable, a crash
    CONFIG = 2  # the configuration is refused


class Refusal(Exception):
    """Start-up refused: log `msg` with `fields` at error level, exit `exit_code`."""

    def __init__(
        self,
        msg: str,
        fields: Mapping[str, str] | None = None,
        *,
        exit_code: ExitCode = ExitCode.CONFIG,
    ) -> None:
        fields = dict(fields or {})
        unknown = set(fields) - ALLOWED_KEYS
        if unknown:
            # A programming error: a new key must be added to the log allowlist deliberately.
            raise ValueError(f"log keys not allowlisted: {sorted(unknown)}")
        super().__init__(msg)
        self.msg = msg
        self.fields: dict[str, str] = fields
        self.exit_code = exit_code

    def log(self, log: Logger) -> None:
        log.record("error", self.msg, self.fields)
