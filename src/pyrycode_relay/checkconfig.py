"""`pyrycode-relay --check-config`: what a start would check, without starting, and the plan.

Owns: the checks that need the filesystem or the network beyond the boot refusals (the
static certificate and key, the ACME CA bundle and cache directory, a cached ACME
certificate, Redis reachability and version and whether --instance-id is held in cluster
mode) and the plan: what the relay would serve, printed as aligned text or as one JSON
object. The boot refusals themselves run first, in `cli`, exactly as for a start. A check is
stricter than a start in two places, both named `check failed: …`: Redis unreachable (a
start serves its local pairs and retries) and an expired certificate (a start serves it and
logs an error); whatever a start refuses, a check refuses with the same line.
Must never: bind a socket, create or change a file or directory, or print a secret (the
Redis URL's password, an environment variable's value, key material).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from pyrycode_relay.core.addresses import Listeners
from pyrycode_relay.core.config import Config, format_size
from pyrycode_relay.core.duration import format_duration
from pyrycode_relay.ops.boot import ENV_FCM_CREDENTIALS, MSG_INSTANCE_LIVE
from pyrycode_relay.ops.log import Logger
from pyrycode_relay.ops.refusal import Refusal

if TYPE_CHECKING:
    from pyrycode_relay.tls.certs import LoadedCert

# A start serves these (it retries Redis, and logs an expired certificate); a check fails.
MSG_EXPIRED: Final = "check failed: tls certificate has expired"
MSG_REDIS: Final = "check failed: redis unreachable"
MSG_REDIS_AUTH: Final = "check failed: redis refused the credentials"
MSG_REDIS_VERSION: Final = "check failed: redis too old"
REDIS_TIMEOUT: Final = 3.0
MIN_REDIS: Final = (7, 0)

Plan = dict[str, str]


def check_config(
    config: Config, listeners: Listeners, environ: Mapping[str, str], log: Logger
) -> Plan:
    """Run every check a start would meet after the boot refusals; the plan, or Refusal."""
    plan: Plan = {"mode": config.mode}
    main = listeners.main.text
    if config.insecure_listen:
        plan["listen"] = f"{main} (plain HTTP behind a TLS-terminating proxy)"
    else:
        proxy = " with a PROXY v2 header" if config.https_proxy_protocol else ""
        plan["listen"] = f"{main} (HTTPS{proxy})"
        if config.domain:
            plan["domain"] = config.domain
    if listeners.acme is not None:
        plan["acme"] = _check_acme(config, listeners.acme.text)
    if config.tls_cert:
        plan["certificate"] = _check_static(config, log)
    metrics = listeners.metrics
    plan["metrics"] = "off" if metrics is None else f"{metrics.text} (/metrics, /readyz)"
    if config.cluster_redis:
        plan["cluster"] = _check_redis(config)
    plan["push"] = "on" if ENV_FCM_CREDENTIALS in environ else "off"
    per_ip = config.max_connections_per_ip
    plan["limits"] = (
        f"{config.max_connections} connections ({per_ip or 'no cap'} per IP), "
        f"{config.max_phones_per_server} phones per server-id, "
        f"messages up to {format_size(config.max_message_bytes)}, "
        f"{format_size(config.phone_outbox_bytes)} per phone outbox, "
        f"{format_size(config.max_buffered_bytes)} for all"
    )
    burst = config.rate_limit_burst
    plan["rate_limit"] = (
        f"{burst} upgrades per IP, one more every {format_duration(config.rate_limit_interval)}"
        if burst
        else "off"
    )
    plan["timers"] = (
        f"heartbeat {format_duration(config.heartbeat_interval)}"
        f" (timeout {format_duration(config.heartbeat_timeout)}),"
        f" grace {format_duration(config.grace_period)},"
        f" drain {format_duration(config.drain_timeout)}"
    )
    return plan


def render(plan: Plan, version: str, log_format: str) -> str:
    """The plan for stdout: aligned lines, or one JSON object under --log-format json."""
    if log_format == "json":
        return json.dumps({"config": "ok", "version": version, **plan}) + "\n"
    width = max(len(key) for key in plan) + 2
    lines = [f"configuration ok: pyrycode-relay {version} would serve"]
    lines.extend(f"  {key.replace('_', ' '):<{width}}{value}" for key, value in plan.items())
    return "\n".join(lines) + "\n"


def _describe(cert: LoadedCert) -> str:
    from pyrycode_relay.tls.mode import days_left, rfc3339

    left = days_left(cert, dt.datetime.now(dt.UTC))
    names = ", ".join(cert.names) or "no DNS names"
    state = f"{left} days left" if left > 0 else "EXPIRED"
    return f"{names}; serial {cert.serial_hex}; not after {rfc3339(cert.not_after)} ({state})"


def _check_static(config: Config, log: Logger) -> str:
    from pyrycode_relay.tls.mode import FIX_STATIC, announce, load_static, rfc3339

    cert = load_static(config.tls_cert, config.tls_key)
    if cert.not_after <= dt.datetime.now(dt.UTC):
        # A start would serve it (and say so); a check fails: every client refuses it.
        raise Refusal(
            MSG_EXPIRED,
            {
                "serial": cert.serial_hex,
                "not_after": rfc3339(cert.not_after),
                "reason": "not_after is in the past: TLS clients refuse this certificate",
                "fix": FIX_STATIC,
            },
        )
    announce(log, cert, config.domain, FIX_STATIC)  # the warnings a start would log
    return f"{config.tls_cert}: {_describe(cert)}"


def _check_acme(config: Config, http_listen: str) -> str:
    from pyrycode_relay.tls.acme import AcmeSettings
    from pyrycode_relay.tls.certcache import CertCacheRefusal, inspect_cert_cache
    from pyrycode_relay.tls.certs import CertificateError, load_pair
    from pyrycode_relay.tls.mode import cert_cache_refused, check_ca_bundle

    check_ca_bundle(config.acme_ca_bundle)
    try:
        found = inspect_cert_cache(config.cert_cache, euid=os.geteuid(), platform=sys.platform)
    except CertCacheRefusal as exc:
        raise cert_cache_refused(config.cert_cache, exc) from None
    cache = {
        "create": "will be created 0700",
        "use": "private",
        "tighten": f"{found.mode}, will be tightened to 0700",
    }[found.action]
    settings = AcmeSettings(
        domain=config.domain,
        directory=config.acme_directory,
        email=config.acme_email,
        ca_bundle=config.acme_ca_bundle,
        cache_dir=config.cert_cache,
        user_agent="",
    )
    if not os.path.exists(settings.cert_path):
        cached = "none yet"  # a start asks the CA
    else:
        try:
            cached = _describe(load_pair(settings.cert_path, settings.key_path))
        except CertificateError as exc:
            cached = f"unusable, a start asks the CA for another ({exc})"
    return (
        f"{config.acme_directory}; HTTP-01 on {http_listen}; cache {config.cert_cache}"
        f" ({cache}); cached certificate: {cached}"
    )


def _redis_location(url: str) -> str:
    """The URL without its credentials: scheme, host, port, database or socket path."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    port = f":{parts.port}" if parts.port else ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _check_redis(config: Config) -> str:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import AuthenticationError, RedisError

    from pyrycode_relay.cluster.store import OwnershipStore

    location = _redis_location(config.cluster_redis)

    async def ask() -> tuple[str, str | None]:
        """(the server's version, this --instance-id's live holder or None)."""
        client = Redis.from_url(
            config.cluster_redis,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            info = await client.info("server")
            holder = None
            if config.instance_id:
                store = OwnershipStore(client, config.instance_id, config.cluster_lease)
                holder = (await store.incarnations([config.instance_id]))[config.instance_id]
        finally:
            await client.aclose()
        return str(info.get("redis_version", "?")), holder

    try:
        version, holder = asyncio.run(ask())
    except (RedisError, OSError) as exc:
        # redis-py's messages name the address dialled, never the URL's password.
        said = " ".join(str(exc).split()) or type(exc).__name__
        msg = MSG_REDIS_AUTH if isinstance(exc, AuthenticationError) else MSG_REDIS
        raise Refusal(msg, {"reason": f"relay: {location}: {said}"}) from None
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if numbers < MIN_REDIS:
        reason = f"relay: {location} runs Redis {version}; cluster mode needs 7.0 or later"
        raise Refusal(MSG_REDIS_VERSION, {"reason": reason})
    if holder is not None:
        wait = format_duration(1.5 * config.cluster_lease)
        raise Refusal(
            MSG_INSTANCE_LIVE,
            {
                "instance_id": config.instance_id,
                "reason": f"relay: a live process holds it; a start waits {wait}, then exits 2",
                "fix": "stop the other process, or give this one another --instance-id",
            },
        )
    instance = config.instance_id or "random at start"
    return (
        f"{location} reachable (Redis {version}); instance {instance};"
        f" lease {format_duration(config.cluster_lease)}"
    )
