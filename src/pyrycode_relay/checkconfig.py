"""`pyrycode-relay --check-config`: what a start would check, without starting, and the plan.

Owns: the checks that need the filesystem or the network beyond the boot refusals (the
static certificate and key, the ACME CA bundle and cache directory, a cached ACME
certificate, Redis reachability and version in cluster mode) and the plan: what the relay
would serve, printed as aligned text or as one JSON object. The boot refusals themselves
run first, in `cli`, exactly as for a start.
Must never: bind a socket, create or change a file or directory, or print a secret (the
Redis URL's password, an environment variable's value, key material).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import sys
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from pyrycode_relay.core.addresses import Listeners
from pyrycode_relay.core.config import Config, format_size
from pyrycode_relay.core.duration import format_duration
from pyrycode_relay.ops.boot import ENV_FCM_CREDENTIALS
from pyrycode_relay.ops.refusal import ExitCode, Refusal

if TYPE_CHECKING:
    from pyrycode_relay.tls.certs import LoadedCert

MSG_CERTIFICATE: Final = "refusing to start: invalid TLS certificate"
MSG_CA_BUNDLE: Final = "refusing to start: invalid --acme-ca-bundle"
MSG_CERT_CACHE: Final = "refusing to start: cert cache"
MSG_REDIS: Final = "refusing to start: redis unreachable"
MSG_REDIS_VERSION: Final = "refusing to start: redis too old"
REDIS_TIMEOUT: Final = 3.0
MIN_REDIS: Final = (7, 0)

Plan = dict[str, str]


def check_config(config: Config, listeners: Listeners, environ: Mapping[str, str]) -> Plan:
    """Run every check a start would meet after the boot refusals; the plan, or Refusal."""
    plan: Plan = {"mode": _mode(config)}
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
        plan["certificate"] = _check_static(config)
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


def _mode(config: Config) -> str:
    if config.insecure_listen:
        return "insecure"
    return "static-tls" if config.tls_cert else "autocert"


def _describe(cert: LoadedCert, now: dt.datetime) -> str:
    days = (cert.not_after - now).total_seconds() / 86400
    when = cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    left = f"{int(days)} days left" if days >= 0 else "EXPIRED"
    names = ", ".join(cert.names) or "no DNS names"
    return f"{names}; serial {cert.serial_hex}; not after {when} ({left})"


def _check_static(config: Config) -> str:
    from pyrycode_relay.tls.certs import CertificateError, load_pair

    try:
        cert = load_pair(config.tls_cert, config.tls_key)
    except CertificateError as exc:
        raise Refusal(MSG_CERTIFICATE, {"reason": str(exc)}) from None
    return f"{config.tls_cert}: {_describe(cert, dt.datetime.now(dt.UTC))}"


def _check_acme(config: Config, http_listen: str) -> str:
    from pyrycode_relay.tls.acme import AcmeSettings
    from pyrycode_relay.tls.certcache import CertCacheRefusal, inspect_cert_cache
    from pyrycode_relay.tls.certs import CertificateError, load_pair

    if config.acme_ca_bundle:
        try:
            ssl.create_default_context(cafile=config.acme_ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or "no PEM certificate in the file"
            raise Refusal(
                MSG_CA_BUNDLE, {"path": config.acme_ca_bundle, "reason": reason}
            ) from None
    try:
        found = inspect_cert_cache(config.cert_cache, euid=os.geteuid(), platform=sys.platform)
    except CertCacheRefusal as exc:
        raise Refusal(
            MSG_CERT_CACHE,
            {"path": config.cert_cache, "reason": str(exc)},
            exit_code=ExitCode.RUNTIME,
        ) from None
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
    try:
        cached = _describe(
            load_pair(settings.cert_path, settings.key_path), dt.datetime.now(dt.UTC)
        )
    except CertificateError:
        cached = "none yet"  # a start asks the CA
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
    from redis.exceptions import RedisError

    location = _redis_location(config.cluster_redis)

    async def server_version() -> str:
        client = Redis.from_url(
            config.cluster_redis,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            info = await client.info("server")
        finally:
            await client.aclose()
        return str(info.get("redis_version", "?"))

    try:
        version = asyncio.run(server_version())
    except (RedisError, OSError) as exc:
        # redis-py's messages name the address dialled, never the URL's password.
        said = " ".join(str(exc).split()) or type(exc).__name__
        reason = f"relay: {location}: {said}"
        raise Refusal(MSG_REDIS, {"reason": reason}) from None
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if numbers < MIN_REDIS:
        reason = f"relay: {location} runs Redis {version}; cluster mode needs 7.0 or later"
        raise Refusal(MSG_REDIS_VERSION, {"reason": reason})
    instance = config.instance_id or "random at start"
    return (
        f"{location} reachable (Redis {version}); instance {instance};"
        f" lease {format_duration(config.cluster_lease)}"
    )
