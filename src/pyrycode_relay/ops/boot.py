"""Boot-time refusals: the configuration checks that end the process with exit code 2.

Owns: the reference's refusal order (§9.3 steps 2-9, 11, 13; step 5 includes validating the
PYRYCODE_RELAY_FCM_CREDENTIALS key), its log event names and reasons, the Linux capability
allowlist, and the parsed listener addresses it hands on (`Listeners`). Must never: log (the
caller logs the `Refusal`), read the process state itself (euid, /proc and the
platform are passed in so every branch is testable), or put an environment variable's value into
a refusal — only names.

Deliberate difference from the reference: with effective uid 0 outside production mode the
capability check is skipped, because root always holds every capability and the reference's root
matrix explicitly allows root outside production mode; running it would make that allowed case
impossible on Linux.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Final

from pyrycode_relay.core.addresses import ListenAddress, Listeners, Network, parse_networks
from pyrycode_relay.core.config import Config
from pyrycode_relay.ops.refusal import Refusal

ENV_PRODUCTION: Final = "PYRYCODE_RELAY_PRODUCTION"
ENV_SINGLE_INSTANCE: Final = "PYRYCODE_RELAY_SINGLE_INSTANCE"
ENV_FLY_APP_NAME: Final = "FLY_APP_NAME"
ENV_FCM_CREDENTIALS: Final = "PYRYCODE_RELAY_FCM_CREDENTIALS"

# The keys the reference's boot refusals carry (§13, keys used by main.go): every refusal
# raised here keeps to them (tests/ops/test_boot.py).
ALLOWED_FIELD_KEYS: Final = frozenset(
    {"reason", "env_var", "fix", "value", "effective_uid", "addr", "bypass_env_var", "mode"}
)

# Log event names, identical to the reference's (README §1: same log event names).
MSG_NO_MODE: Final = (
    "either --domain (for autocert) or --insecure-listen (for behind-proxy mode) must be set"
)
MSG_INSTANCE_ID_ALONE: Final = "refusing to start: --instance-id needs --cluster-redis"
MSG_CLUSTER_LEASE_ALONE: Final = "refusing to start: --cluster-lease needs --cluster-redis"
MSG_CLUSTER_REDIS: Final = "refusing to start: invalid --cluster-redis"
MSG_INSTANCE_ID: Final = "refusing to start: invalid --instance-id"
MSG_INSTANCE_LIVE: Final = "refusing to start: instance id already live in the cluster"
MSG_INSECURE_EXCLUSIVE: Final = (
    "refusing to start: --insecure-listen is mutually exclusive with "
    "--http-listen / --https-listen / --https-proxy-protocol"
)
MSG_MAX_CONNECTIONS: Final = "refusing to start: invalid --max-connections"
MSG_ENV: Final = "refusing to start: invalid env-var config"
MSG_MULTI_INSTANCE: Final = "refusing to start: multi-instance deploy detected"
MSG_PRODUCTION: Final = "refusing to start: production-mode misconfiguration"
MSG_CAPS: Final = "refusing to start: unexpected Linux capabilities"
MSG_METRICS_LISTEN: Final = "refusing to start: invalid --metrics-listen address"
MSG_LISTENER: Final = "refusing to start: invalid listener address"
MSG_TLS_PAIR: Final = "refusing to start: --tls-cert and --tls-key must be given together"
MSG_STATIC_EXCLUSIVE: Final = (
    "refusing to start: --tls-cert/--tls-key are mutually exclusive with the ACME flags"
)
MSG_PROXY_ALLOW: Final = "refusing to start: invalid --proxy-protocol-allow"

REASON_CONN_CAP: Final = "relay: connection cap must be positive"
REASON_MULTI_INSTANCE: Final = (
    "relay: multi-instance deploy detected; set PYRYCODE_RELAY_SINGLE_INSTANCE=1 to bypass"
)
REASON_INSECURE_PROD: Final = (
    "relay: --insecure-listen is set with PYRYCODE_RELAY_PRODUCTION=1; refusing to start"
)
REASON_ROOT_PROD: Final = (
    "relay: effective uid is 0 with PYRYCODE_RELAY_PRODUCTION=1; refusing to start"
)
REASON_CAPS: Final = "relay: process has unexpected effective Linux capabilities"
REASON_METRICS: Final = "relay: metrics listener bind address must be a loopback IP literal"
REASON_FCM_CREDENTIALS: Final = (
    f"relay: invalid env-var config: {ENV_FCM_CREDENTIALS}: "
    "not a service-account JSON key (value withheld)"
)

# Flags that only configure the TLS listeners and therefore do nothing in insecure mode. The
# first three are the reference's; the rest are our additions and get the same treatment.
_REFERENCE_TLS_ONLY_FLAGS: Final = ("http-listen", "https-listen", "https-proxy-protocol")
_TLS_ONLY_FLAGS: Final = (
    *_REFERENCE_TLS_ONLY_FLAGS,
    "domain",
    "tls-cert",
    "tls-key",
    "acme-directory",
    "acme-email",
    "acme-ca-bundle",
    "proxy-protocol-allow",
)
# Flags that only configure ACME and therefore do nothing with static certificates.
_ACME_ONLY_FLAGS: Final = (
    "http-listen",
    "cert-cache",
    "acme-directory",
    "acme-email",
    "acme-ca-bundle",
)

CAP_NET_BIND_SERVICE: Final = 10
_ALLOWED_CAP_MASK: Final = 1 << CAP_NET_BIND_SERVICE

# include/uapi/linux/capability.h; bit positions are stable kernel ABI and only ever append.
CAPABILITY_NAMES: Final[tuple[str, ...]] = (
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
)

_FIX_NO_MODE: Final = (
    "pass --insecure-listen ADDR (behind a TLS-terminating proxy), --domain NAME (certificates "
    "from ACME) or --tls-cert FILE --tls-key FILE (static certificates)"
)
_FIX_INSECURE_EXCLUSIVE: Final = (
    "use --insecure-listen alone (proxy-fronted plaintext mode), OR use --domain with optional "
    "--http-listen / --https-listen (autocert mode); the TLS listener flags have no effect in "
    "insecure mode"
)
_FIX_TLS_PAIR: Final = "pass both PEM files (certificate chain and private key), or neither"
_FIX_STATIC_EXCLUSIVE: Final = (
    "static certificates need no ACME listener or cache; drop the flag, or drop --tls-cert/"
    "--tls-key to use ACME"
)
_FIX_INSTANCE_ID_ALONE: Final = "add --cluster-redis URL for cluster mode, or drop --instance-id"
_FIX_CLUSTER_LEASE_ALONE: Final = (
    "add --cluster-redis URL for cluster mode, or drop --cluster-lease"
)
_FIX_CLUSTER_REDIS: Final = (
    "use redis://[user:password@]host[:port][/db], rediss://... for TLS, or unix:///path/to/socket"
)
_FIX_INSTANCE_ID: Final = "use 1-64 characters from A-Z a-z 0-9 . _ -, or omit it for a random id"
_INSTANCE_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FIX_MAX_CONNECTIONS: Final = "pass a positive connection count, or omit the flag for the default"
_FIX_ENV: Final = 'set the variable to exactly "1" or unset it'
_FIX_FCM_CREDENTIALS: Final = (
    "set it to the whole service-account JSON key file (type service_account, client_email, "
    "an RSA private_key), or unset it to run with push off"
)
_FIX_MULTI_INSTANCE: Final = (
    "set PYRYCODE_RELAY_SINGLE_INSTANCE=1 in the deploy manifest (e.g. fly.toml [env]) to assert "
    "single-instance intent"
)
_FIX_INSECURE_PROD: Final = (
    "remove --insecure-listen and set --domain, or unset PYRYCODE_RELAY_PRODUCTION"
)
_FIX_ROOT_PROD: Final = (
    "drop privileges before exec (e.g. Dockerfile USER directive or --user <non-zero>, kubernetes "
    "securityContext.runAsUser), or unset PYRYCODE_RELAY_PRODUCTION if the deploy is truly dev"
)
_FIX_CAPS: Final = (
    "drop extra capabilities (e.g. --cap-drop=ALL --cap-add=NET_BIND_SERVICE on docker, or "
    "securityContext.capabilities on kubernetes)"
)
_FIX_METRICS: Final = (
    "use a loopback IP literal such as 127.0.0.1:9090 or [::1]:9090, or pass --metrics-listen= "
    "to disable"
)

_HEX: Final = re.compile(r"[0-9a-fA-F]+")


def check_boot(
    config: Config,
    environ: Mapping[str, str],
    *,
    euid: int,
    proc_status: str | None,
    platform: str,
) -> Listeners:
    """Raise Refusal for the first refused condition, in the reference's order; return what
    the configuration binds, parsed.

    `proc_status` is the text of /proc/self/status (None if unreadable); `platform` is
    `sys.platform`.
    """
    insecure = config.insecure_listen != ""
    static = config.tls_cert != "" or config.tls_key != ""

    if not insecure and config.domain == "" and not static:
        raise Refusal(MSG_NO_MODE, {"fix": _FIX_NO_MODE})

    cluster = config.cluster_redis != ""
    if cluster or "instance-id" in config.explicit or "cluster-lease" in config.explicit:
        _check_cluster_flags(config)

    if insecure:
        for flag in _TLS_ONLY_FLAGS:
            if flag in config.explicit:
                msg = (
                    MSG_INSECURE_EXCLUSIVE
                    if flag in _REFERENCE_TLS_ONLY_FLAGS
                    else f"refusing to start: --insecure-listen is mutually exclusive with --{flag}"
                )
                raise Refusal(msg, {"value": f"--{flag}", "fix": _FIX_INSECURE_EXCLUSIVE})
        proxy_allow: tuple[Network, ...] = ()
    else:
        proxy_allow = _check_tls_flags(config, static)

    if config.max_connections <= 0:
        raise Refusal(
            MSG_MAX_CONNECTIONS,
            {
                "reason": REASON_CONN_CAP,
                "value": str(config.max_connections),
                "fix": _FIX_MAX_CONNECTIONS,
            },
        )

    # Validated before anything reads them, so a typo like PRODUCTION=true cannot silently mean
    # "not production". The value is never echoed (the reference does; we never log env values).
    for name in (ENV_PRODUCTION, ENV_SINGLE_INSTANCE):
        if name in environ and environ[name] != "1":
            raise Refusal(
                MSG_ENV,
                {
                    "env_var": name,
                    "reason": (
                        f"relay: invalid env-var config: {name}: "
                        'malformed-value: expected "1" or unset'
                    ),
                    "fix": _FIX_ENV,
                },
            )
    if ENV_FCM_CREDENTIALS in environ:
        _check_fcm_credentials(environ[ENV_FCM_CREDENTIALS])
    production = environ.get(ENV_PRODUCTION) == "1"

    # Cluster mode is the multi-instance intent the check exists to ask for.
    if (
        not cluster
        and environ.get(ENV_FLY_APP_NAME, "") != ""
        and environ.get(ENV_SINGLE_INSTANCE) != "1"
    ):
        raise Refusal(
            MSG_MULTI_INSTANCE,
            {
                "reason": REASON_MULTI_INSTANCE,
                "bypass_env_var": ENV_SINGLE_INSTANCE,
                "fix": _FIX_MULTI_INSTANCE,
            },
        )

    if production and insecure:
        raise Refusal(
            MSG_PRODUCTION,
            {"reason": REASON_INSECURE_PROD, "env_var": ENV_PRODUCTION, "fix": _FIX_INSECURE_PROD},
        )

    if production and euid == 0:
        raise Refusal(
            MSG_PRODUCTION,
            {
                "reason": REASON_ROOT_PROD,
                "env_var": ENV_PRODUCTION,
                "effective_uid": str(euid),
                "fix": _FIX_ROOT_PROD,
            },
        )

    # Root outside production mode is allowed (above), and root holds every capability.
    if platform == "linux" and euid != 0:
        _check_capabilities(proc_status)

    metrics: ListenAddress | None = None
    if config.metrics_listen != "":
        try:
            metrics = ListenAddress.parse(config.metrics_listen)
        except ValueError:
            metrics = None
        if metrics is None or not metrics.is_loopback_literal:
            raise Refusal(
                MSG_METRICS_LISTEN,
                {"reason": REASON_METRICS, "addr": config.metrics_listen, "fix": _FIX_METRICS},
            )

    if insecure:
        texts = [config.insecure_listen]
    elif static:
        texts = [config.https_listen]  # no ACME, so no port-80 listener
    else:
        texts = [config.https_listen, config.http_listen]
    parsed: list[ListenAddress] = []
    for text in texts:
        try:
            parsed.append(ListenAddress.parse(text))
        except ValueError as exc:
            raise Refusal(MSG_LISTENER, {"reason": str(exc), "addr": text}) from None
    acme = parsed[1] if len(parsed) > 1 else None
    return Listeners(main=parsed[0], acme=acme, metrics=metrics, proxy_allow=proxy_allow)


def _check_cluster_flags(config: Config) -> None:
    """Cluster mode needs a usable Redis URL and a well-formed instance id. The URL is never
    echoed: it may carry a password."""
    if config.cluster_redis == "":
        if "instance-id" in config.explicit:
            raise Refusal(MSG_INSTANCE_ID_ALONE, {"fix": _FIX_INSTANCE_ID_ALONE})
        raise Refusal(MSG_CLUSTER_LEASE_ALONE, {"fix": _FIX_CLUSTER_LEASE_ALONE})
    reason = redis_url_problem(config.cluster_redis)
    if reason is not None:
        raise Refusal(MSG_CLUSTER_REDIS, {"reason": reason, "fix": _FIX_CLUSTER_REDIS})
    if "instance-id" in config.explicit and not _INSTANCE_ID.fullmatch(config.instance_id):
        raise Refusal(
            MSG_INSTANCE_ID,
            {
                "reason": "relay: instance id has a character or length outside the allowed set",
                "fix": _FIX_INSTANCE_ID,
            },
        )


def redis_url_problem(url: str) -> str | None:
    """Why `url` is not a Redis URL we can dial, or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises for a non-numeric or out-of-range port
    except ValueError:
        return "relay: redis URL does not parse"
    if parts.scheme == "unix":
        return None if parts.path else "relay: unix:// redis URL has no socket path"
    if parts.scheme not in ("redis", "rediss"):
        return "relay: redis URL scheme must be redis, rediss or unix"
    if not parts.hostname:
        return "relay: redis URL has no host"
    if port == 0:
        return "relay: redis URL port must be 1-65535"
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return "relay: redis URL database must be a number"
    return None


def _check_fcm_credentials(value: str) -> None:
    """Set (even to "") means push is wanted: the key must be usable, or the boot is refused.
    The parser's error never carries the value, and neither does the refusal."""
    # Imported here: the key parser pulls in google-auth and cryptography, which a relay
    # without push never needs at start-up.
    from pyrycode_relay.ops.fcm import CredentialsError, parse_service_account

    try:
        parse_service_account(value)
    except CredentialsError:
        raise Refusal(
            MSG_ENV,
            {
                "env_var": ENV_FCM_CREDENTIALS,
                "reason": REASON_FCM_CREDENTIALS,
                "fix": _FIX_FCM_CREDENTIALS,
            },
        ) from None


def _check_tls_flags(config: Config, static: bool) -> tuple[Network, ...]:
    """Flag rules of the TLS modes (ours; the reference has only autocert)."""
    if static:
        if config.tls_cert == "" or config.tls_key == "":
            raise Refusal(MSG_TLS_PAIR, {"fix": _FIX_TLS_PAIR})
        for flag in _ACME_ONLY_FLAGS:
            if flag in config.explicit:
                raise Refusal(
                    MSG_STATIC_EXCLUSIVE, {"value": f"--{flag}", "fix": _FIX_STATIC_EXCLUSIVE}
                )
    if "proxy-protocol-allow" in config.explicit and not config.https_proxy_protocol:
        raise Refusal(
            MSG_PROXY_ALLOW,
            {"reason": "relay: --proxy-protocol-allow needs --https-proxy-protocol"},
        )
    try:
        return parse_networks(config.proxy_protocol_allow)
    except ValueError as exc:
        raise Refusal(MSG_PROXY_ALLOW, {"reason": f"relay: {exc}"}) from None


def _check_capabilities(proc_status: str | None) -> None:
    if proc_status is None:
        reason = "relay: reading /proc/self/status failed"
    else:
        try:
            mask = parse_cap_eff(proc_status)
        except ValueError as exc:
            reason = str(exc)
        else:
            unexpected = mask & ~_ALLOWED_CAP_MASK
            if unexpected == 0:
                return
            raise Refusal(
                MSG_CAPS,
                {"reason": REASON_CAPS, "value": capability_names(unexpected), "fix": _FIX_CAPS},
            )
    # Unreadable or unparsable /proc is refused too: the allowlist must not fail open.
    raise Refusal(MSG_CAPS, {"reason": reason, "fix": _FIX_CAPS})


def parse_cap_eff(proc_status: str) -> int:
    """The `CapEff:` mask from /proc/self/status text; ValueError if missing or not hex."""
    for line in proc_status.split("\n"):
        if line.startswith("CapEff:"):
            value = line[len("CapEff:") :].strip()
            if _HEX.fullmatch(value) is None or int(value, 16) >= 1 << 64:
                raise ValueError("relay: parsing /proc/self/status CapEff: not a 64-bit hex mask")
            return int(value, 16)
    raise ValueError("relay: /proc/self/status missing CapEff line")


def capability_names(mask: int) -> str:
    """`cap_net_admin,cap_sys_admin` for the set bits, ascending; unknown bits as `cap_<n>`."""
    names = []
    for bit in range(mask.bit_length()):
        if mask >> bit & 1:
            names.append(CAPABILITY_NAMES[bit] if bit < len(CAPABILITY_NAMES) else f"cap_{bit}")
    return ",".join(names)
