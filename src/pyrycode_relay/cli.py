"""The `pyrycode-relay` command: parse flags, refuse bad boots, serve.

Owns: turning argv + environment into a Config, refusing a bad boot (ops.boot), handing the
rest to `RelayServer` on the event loop it chooses (uvloop when installed), and the exit code
(ops.refusal.ExitCode) with its one-line reason.
Must never: print an environment variable's value or any secret.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from pyrycode_relay import __version__, source_revision
from pyrycode_relay.core.addresses import Listeners
from pyrycode_relay.core.config import (
    Config,
    ConfigError,
    HelpRequested,
    log_format_hint,
    parse_args,
    usage,
)
from pyrycode_relay.ops import logbridge
from pyrycode_relay.ops.boot import (
    ENV_FCM_CREDENTIALS,
    ENV_PRODUCTION,
    ENV_SINGLE_INSTANCE,
    check_boot,
)
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.refusal import ExitCode, Refusal
from pyrycode_relay.ops.sdnotify import SystemdNotifier

MSG_BAD_COMMAND_LINE = "refusing to start: invalid command line"


def help_text() -> str:
    """`--help`: the commands, the modes, every flag, and what only the environment sets."""
    return (
        "Usage: pyrycode-relay [FLAGS]                 serve\n"
        "       pyrycode-relay --check-config [FLAGS]  check the configuration, print the plan\n"
        "       pyrycode-relay probe [OPTIONS] URL     check a running relay (probe --help)\n"
        "       pyrycode-relay bench SCENARIO [...]    measure a relay under load (bench --help)\n"
        "       pyrycode-relay upgrade PID             hand a running relay over to a new process\n"
        "\n"
        "Modes (exactly one):\n"
        "  --insecure-listen ADDR          plain HTTP behind a TLS-terminating proxy\n"
        "  --domain NAME                   TLS with certificates from ACME (Let's Encrypt)\n"
        "  --tls-cert FILE --tls-key FILE  TLS with PEM files (SIGHUP reloads them)\n"
        "Any mode plus --cluster-redis URL runs several instances as one relay.\n"
        "\n"
        "Flags:\n" + usage() + "\n"
        "Set only in the environment (values are never logged):\n"
        f"  {ENV_FCM_CREDENTIALS:<34} service-account JSON key; turns push wake on\n"
        f"  {ENV_PRODUCTION + '=1':<34} refuse insecure mode and running as root\n"
        f"  {ENV_SINGLE_INSTANCE + '=1':<34} assert one instance where FLY_APP_NAME is set\n"
        f"  {'NOTIFY_SOCKET':<34} set by systemd (Type=notify): READY, RELOADING, STOPPING\n"
        "\n"
        "Signals: SIGTERM/SIGINT drain (close 1001), SIGHUP reloads static TLS files,\n"
        "SIGUSR2 hands listeners and connections to a new process (insecure mode keeps\n"
        "every WebSocket; TLS modes drain theirs).\n"
        "Exit codes: 0 clean exit, 1 runtime or listener failure, 2 configuration refused.\n"
    )


def _proc_status() -> str | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _run(
    config: Config,
    listeners: Listeners,
    log: Logger,
    fcm_credentials: str | None,
    argv: Sequence[str],
) -> int:
    from pyrycode_relay.handover.taker import Predecessor
    from pyrycode_relay.server import RelayServer

    notifier = SystemdNotifier(os.environ, lambda err: log.warn("sd_notify failed", err=err))
    # Set when a relay started us to take over from it (SIGUSR2); taken out of the
    # environment, so our own successor gets its own.
    predecessor = Predecessor.from_environ(os.environ, config.handover_test)

    async def serve() -> ExitCode:
        server = RelayServer(
            config,
            listeners,
            log,
            __version__,
            fcm_credentials,
            notifier=notifier,
            argv=argv,
            predecessor=predecessor,
        )
        return await server.run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve())
    return uvloop.run(serve())


def _check_config(config: Config, listeners: Listeners, log: Logger) -> int:
    from pyrycode_relay.checkconfig import check_config, render

    try:
        plan = check_config(config, listeners, os.environ, log)
    except Refusal as refusal:
        refusal.log(log)
        return refusal.exit_code
    sys.stdout.write(render(plan, __version__, config.log_format))
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["probe"]:  # tooling subcommand (README §2); never needed to serve
        from pyrycode_relay.tools.probe import main as probe_main

        return probe_main(args[1:])
    if args[:1] == ["upgrade"]:  # operator subcommand: SIGUSR2 and wait for the outcome
        from pyrycode_relay.handover.command import main as upgrade_main

        return upgrade_main(args[1:])
    if args[:1] == ["bench"]:  # tooling subcommand: load and measurement
        from pyrycode_relay.tools.bench.cli import main as bench_main

        return bench_main(args[1:])
    try:
        config = parse_args(args, os.environ)
    except HelpRequested:
        sys.stdout.write(help_text())
        return ExitCode.OK
    except ConfigError as exc:
        # Reported like every other refusal, in the format the command line asked for.
        refused = Logger(sys.stderr, log_format_hint(args, os.environ), "info")
        refused.error(MSG_BAD_COMMAND_LINE, reason=str(exc), fix="see --help")
        return ExitCode.CONFIG
    if config.version:
        revision = source_revision()
        print(__version__ if revision is None else f"{__version__} (revision {revision})")
        return ExitCode.OK
    log = Logger(sys.stderr, config.log_format, config.log_level)
    logbridge.install(log)  # from here on, every line the process writes is the logger's
    try:
        listeners = check_boot(
            config,
            os.environ,
            euid=os.geteuid(),
            proc_status=_proc_status(),
            platform=sys.platform,
        )
    except Refusal as refusal:
        refusal.log(log)
        return refusal.exit_code
    if config.check_config:
        return _check_config(config, listeners, log)
    if os.getpid() == 1:
        # A container's first process: stay behind as its init, so that a live handover's
        # successor outlives the relay it replaces (the relay runs as our child).
        from pyrycode_relay.handover.init import serve_as_init

        return serve_as_init(args, os.environ)
    try:
        # The key goes to the push sender only; it is never part of Config (which is printed
        # in errors and tests) nor logged.
        return _run(config, listeners, log, os.environ.get(ENV_FCM_CREDENTIALS), args)
    except KeyboardInterrupt:
        return ExitCode.OK
