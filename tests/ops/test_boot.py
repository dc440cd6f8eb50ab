from __future__ import annotations

import pytest

from pyrycode_relay.core.addresses import ListenAddress, Listeners
from pyrycode_relay.core.config import Config, parse_args
from pyrycode_relay.ops.boot import (
    ALLOWED_FIELD_KEYS,
    CAPABILITY_NAMES,
    capability_names,
    check_boot,
    parse_cap_eff,
)
from pyrycode_relay.ops.refusal import Refusal
from tests.e2e.fake_google import service_account

INSECURE = ["--insecure-listen", "127.0.0.1:8080"]


def parse_listen_address(addr: str) -> tuple[str, int]:
    parsed = ListenAddress.parse(addr)
    return parsed.host, parsed.port


def is_loopback_listen_address(addr: str) -> bool:
    try:
        return ListenAddress.parse(addr).is_loopback_literal
    except ValueError:
        return False


DOMAIN = ["--domain", "relay.example"]


def status(cap_eff: str) -> str:
    return f"Name:\trelay\nUid:\t1000\t1000\t1000\t1000\nCapPrm:\t{cap_eff}\nCapEff:\t{cap_eff}\n"


NO_CAPS = status("0000000000000000")
ALL_CAPS = status("000001ffffffffff")


def cfg(*argv: str, env: dict[str, str] | None = None) -> Config:
    return parse_args(list(argv), env or {})


def boot(
    config: Config,
    env: dict[str, str] | None = None,
    *,
    euid: int = 1000,
    proc_status: str | None = NO_CAPS,
    platform: str = "linux",
) -> Listeners:
    return check_boot(config, env or {}, euid=euid, proc_status=proc_status, platform=platform)


def refusal(
    config: Config,
    env: dict[str, str] | None = None,
    *,
    euid: int = 1000,
    proc_status: str | None = NO_CAPS,
    platform: str = "linux",
) -> Refusal:
    with pytest.raises(Refusal) as info:
        boot(config, env, euid=euid, proc_status=proc_status, platform=platform)
    r = info.value
    assert r.exit_code == 2
    assert set(r.fields) <= ALLOWED_FIELD_KEYS
    return r


# --- happy paths ------------------------------------------------------------------------------


def test_insecure_alone_boots() -> None:
    boot(cfg(*INSECURE))


def test_domain_mode_boots() -> None:
    boot(cfg(*DOMAIN, "--http-listen=:8080", "--https-listen=:8443", "--https-proxy-protocol"))


def test_insecure_with_domain_is_refused_not_silently_insecure() -> None:
    r = refusal(cfg(*INSECURE, *DOMAIN))
    assert r.msg == "refusing to start: --insecure-listen is mutually exclusive with --domain"


# --- 1. mode ----------------------------------------------------------------------------------


def test_neither_domain_nor_insecure() -> None:
    r = refusal(cfg())
    assert r.msg == (
        "either --domain (for autocert) or --insecure-listen (for behind-proxy mode) must be set"
    )
    assert str(r) == r.msg
    assert "--tls-cert" in r.fields["fix"]  # every mode is named, the static one too


# --- 2. insecure exclusivity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["--http-listen=:80", "--https-listen=:443", "--https-proxy-protocol"]
)
def test_insecure_with_reference_tls_flags(flag: str) -> None:
    r = refusal(cfg(*INSECURE, flag))
    assert r.msg == (
        "refusing to start: --insecure-listen is mutually exclusive with "
        "--http-listen / --https-listen / --https-proxy-protocol"
    )
    assert r.fields["value"] == flag.partition("=")[0]
    assert "fix" in r.fields


def test_insecure_with_explicit_false_proxy_protocol() -> None:
    r = refusal(cfg(*INSECURE, "--https-proxy-protocol=false"))
    assert "mutually exclusive" in r.msg


@pytest.mark.parametrize(
    "flag", ["domain", "tls-cert", "tls-key", "acme-directory", "acme-email", "acme-ca-bundle"]
)
def test_insecure_with_our_tls_flags(flag: str) -> None:
    r = refusal(cfg(*INSECURE, f"--{flag}=x"))
    assert r.msg == f"refusing to start: --insecure-listen is mutually exclusive with --{flag}"


def test_insecure_with_tls_flag_from_env() -> None:
    r = refusal(cfg(*INSECURE, env={"PYRYCODE_RELAY_HTTP_LISTEN": ":80"}))
    assert "mutually exclusive" in r.msg


def test_insecure_with_cert_cache_is_fine() -> None:
    boot(cfg(*INSECURE, "--cert-cache=/tmp/x"))


# --- 3. max connections -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_connections(value: str) -> None:
    r = refusal(cfg(*INSECURE, f"--max-connections={value}"))
    assert r.msg == "refusing to start: invalid --max-connections"
    assert r.fields["reason"] == "relay: connection cap must be positive"
    assert r.fields["value"] == value


# --- 4. environment ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["PYRYCODE_RELAY_PRODUCTION", "PYRYCODE_RELAY_SINGLE_INSTANCE"])
@pytest.mark.parametrize("value", ["", "true", "0", " 1", "1 ", "yes-s3cr3t"])
def test_env_malformed(name: str, value: str) -> None:
    r = refusal(cfg(*DOMAIN), {name: value})
    assert r.msg == "refusing to start: invalid env-var config"
    assert r.fields["env_var"] == name
    assert r.fields["reason"] == (
        f'relay: invalid env-var config: {name}: malformed-value: expected "1" or unset'
    )
    if value.strip():
        assert all(value not in v for v in r.fields.values())


def test_env_exactly_one_accepted() -> None:
    boot(cfg(*DOMAIN), {"PYRYCODE_RELAY_PRODUCTION": "1", "PYRYCODE_RELAY_SINGLE_INSTANCE": "1"})


def test_env_checked_before_multi_instance() -> None:
    r = refusal(cfg(*DOMAIN), {"FLY_APP_NAME": "x", "PYRYCODE_RELAY_SINGLE_INSTANCE": "true"})
    assert r.fields["env_var"] == "PYRYCODE_RELAY_SINGLE_INSTANCE"


FCM_REASON = (
    "relay: invalid env-var config: PYRYCODE_RELAY_FCM_CREDENTIALS: "
    "not a service-account JSON key (value withheld)"
)


@pytest.mark.parametrize("value", ["garbage-s3cr3t", "", '{"type":"service_account"}'])
def test_fcm_credentials_refused_without_echo(value: str) -> None:
    r = refusal(cfg(*DOMAIN), {"PYRYCODE_RELAY_FCM_CREDENTIALS": value})
    assert r.msg == "refusing to start: invalid env-var config"
    assert r.fields["env_var"] == "PYRYCODE_RELAY_FCM_CREDENTIALS"
    assert r.fields["reason"] == FCM_REASON
    assert all("s3cr3t" not in v for v in r.fields.values())


def test_fcm_credentials_valid_key_accepted() -> None:
    boot(cfg(*DOMAIN), {"PYRYCODE_RELAY_FCM_CREDENTIALS": service_account(None)})


def test_fcm_credentials_checked_with_the_env_vars() -> None:
    # step 5, after the two flag-like variables and before the multi-instance check
    r = refusal(
        cfg(*DOMAIN),
        {"PYRYCODE_RELAY_PRODUCTION": "true", "PYRYCODE_RELAY_FCM_CREDENTIALS": "x"},
    )
    assert r.fields["env_var"] == "PYRYCODE_RELAY_PRODUCTION"
    r = refusal(cfg(*DOMAIN), {"FLY_APP_NAME": "x", "PYRYCODE_RELAY_FCM_CREDENTIALS": "x"})
    assert r.fields["env_var"] == "PYRYCODE_RELAY_FCM_CREDENTIALS"


# --- 5. multi-instance ------------------------------------------------------------------------


def test_fly_without_bypass() -> None:
    r = refusal(cfg(*DOMAIN), {"FLY_APP_NAME": "pyrycode-relay"})
    assert r.msg == "refusing to start: multi-instance deploy detected"
    assert r.fields["reason"] == (
        "relay: multi-instance deploy detected; set PYRYCODE_RELAY_SINGLE_INSTANCE=1 to bypass"
    )
    assert r.fields["bypass_env_var"] == "PYRYCODE_RELAY_SINGLE_INSTANCE"


def test_fly_with_bypass() -> None:
    boot(cfg(*DOMAIN), {"FLY_APP_NAME": "x", "PYRYCODE_RELAY_SINGLE_INSTANCE": "1"})


def test_fly_empty_is_not_fly() -> None:
    boot(cfg(*DOMAIN), {"FLY_APP_NAME": ""})


def test_cluster_mode_boots_with_a_redis_url_and_bypasses_the_fly_check() -> None:
    # Cluster mode is the multi-instance intent FLY_APP_NAME's refusal asks for.
    boot(cfg(*DOMAIN, "--cluster-redis=redis://:pw@10.0.0.5:6380/2"), {"FLY_APP_NAME": "x"})
    boot(cfg(*DOMAIN, "--cluster-redis=unix:///run/redis.sock", "--instance-id=eu-1.a_b"), {})


@pytest.mark.parametrize("flag", ["instance-id=a", "cluster-lease=5s"])
def test_cluster_flags_without_cluster_redis_are_refused(flag: str) -> None:
    r = refusal(cfg(*DOMAIN, f"--{flag}"), {})
    assert r.msg == f"refusing to start: --{flag.split('=', maxsplit=1)[0]} needs --cluster-redis"
    assert r.exit_code == 2


@pytest.mark.parametrize(
    "url",
    [
        "http://secret@127.0.0.1:6379",
        "redis://:secret@127.0.0.1:notaport",
        "redis://:secret@127.0.0.1:70000",
        "redis://:secret@/0",
        "redis://:secret@127.0.0.1:6379/db",
        "unix://",
    ],
)
def test_bad_cluster_redis_url_is_refused_without_echoing_it(url: str) -> None:
    r = refusal(cfg(*DOMAIN, f"--cluster-redis={url}"), {})
    assert r.msg == "refusing to start: invalid --cluster-redis"
    assert r.exit_code == 2
    assert "secret" not in str(r.fields)  # a Redis URL may carry a password


@pytest.mark.parametrize("instance_id", ["a b", "x" * 65, "", "é"])
def test_bad_instance_id_is_refused(instance_id: str) -> None:
    r = refusal(
        cfg(*DOMAIN, "--cluster-redis=redis://127.0.0.1", f"--instance-id={instance_id}"), {}
    )
    assert r.msg == "refusing to start: invalid --instance-id"
    assert r.exit_code == 2


# --- 6./7. production -------------------------------------------------------------------------

PROD = {"PYRYCODE_RELAY_PRODUCTION": "1"}


def test_production_with_insecure() -> None:
    r = refusal(cfg(*INSECURE), PROD)
    assert r.msg == "refusing to start: production-mode misconfiguration"
    assert r.fields["reason"] == (
        "relay: --insecure-listen is set with PYRYCODE_RELAY_PRODUCTION=1; refusing to start"
    )
    assert r.fields["env_var"] == "PYRYCODE_RELAY_PRODUCTION"


def test_production_as_root() -> None:
    r = refusal(cfg(*DOMAIN), PROD, euid=0, proc_status=ALL_CAPS)
    assert r.msg == "refusing to start: production-mode misconfiguration"
    assert r.fields["reason"] == (
        "relay: effective uid is 0 with PYRYCODE_RELAY_PRODUCTION=1; refusing to start"
    )
    assert r.fields["effective_uid"] == "0"


def test_production_as_nobody() -> None:
    boot(cfg(*DOMAIN), PROD, euid=65534)


# --- 8. capabilities --------------------------------------------------------------------------


def test_root_outside_production_with_full_caps_boots() -> None:
    boot(cfg(*DOMAIN), euid=0, proc_status=ALL_CAPS)
    boot(cfg(*DOMAIN), euid=0, proc_status=None)


def test_net_bind_service_only_is_allowed() -> None:
    boot(cfg(*DOMAIN), euid=1000, proc_status=status("0000000000000400"))


def test_unexpected_caps_refused() -> None:
    r = refusal(cfg(*DOMAIN), euid=1000, proc_status=status("0000000000003000"))
    assert r.msg == "refusing to start: unexpected Linux capabilities"
    assert r.fields["reason"] == "relay: process has unexpected effective Linux capabilities"
    assert r.fields["value"] == "cap_net_admin,cap_net_raw"


def test_unexpected_caps_name_all_but_the_allowed_one() -> None:
    r = refusal(cfg(*DOMAIN), proc_status=status("0000000000200401"))
    assert r.fields["value"] == "cap_chown,cap_sys_admin"


def test_unreadable_proc_refused() -> None:
    r = refusal(cfg(*DOMAIN), euid=1000, proc_status=None)
    assert r.msg == "refusing to start: unexpected Linux capabilities"
    assert "reading /proc/self/status" in r.fields["reason"]


@pytest.mark.parametrize(
    "text", ["Name:\trelay\n", "CapEff:\n", "CapEff:\tzz\n", "CapEff:\t0x400\n", "CapEff:\t-1\n"]
)
def test_unparsable_proc_refused(text: str) -> None:
    r = refusal(cfg(*DOMAIN), proc_status=text)
    assert r.msg == "refusing to start: unexpected Linux capabilities"
    assert r.fields["reason"].startswith("relay: ")


@pytest.mark.parametrize("platform", ["darwin", "win32", "freebsd14"])
def test_no_cap_check_off_linux(platform: str) -> None:
    boot(cfg(*DOMAIN), proc_status=None, platform=platform)
    boot(cfg(*DOMAIN), proc_status=ALL_CAPS, platform=platform)


def test_parse_cap_eff() -> None:
    assert parse_cap_eff("CapInh:\t0\nCapEff:  0000000000000400\n") == 0x400
    assert parse_cap_eff("CapEff:\tffffffffffffffff") == (1 << 64) - 1
    with pytest.raises(ValueError):
        parse_cap_eff("CapEff:\t1ffffffffffffffff")


def test_capability_names() -> None:
    assert len(CAPABILITY_NAMES) == 41
    assert CAPABILITY_NAMES[0] == "cap_chown"
    assert CAPABILITY_NAMES[10] == "cap_net_bind_service"
    assert CAPABILITY_NAMES[21] == "cap_sys_admin"
    assert CAPABILITY_NAMES[40] == "cap_checkpoint_restore"
    assert capability_names((1 << 12) | (1 << 21)) == "cap_net_admin,cap_sys_admin"
    assert capability_names((1 << 41) | (1 << 63)) == "cap_41,cap_63"
    assert capability_names(0) == ""


# --- 9. metrics listener ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    ["127.0.0.1:9090", "127.1.2.3:1", "[::1]:9090", "[127.0.0.1]:9090", "[::ffff:127.0.0.1]:65535"],
)
def test_metrics_loopback_accepted(addr: str) -> None:
    assert is_loopback_listen_address(addr)
    boot(cfg(*DOMAIN, f"--metrics-listen={addr}"))


def test_metrics_empty_disables() -> None:
    boot(cfg(*DOMAIN, "--metrics-listen="))


@pytest.mark.parametrize(
    "addr",
    [
        "0.0.0.0:9090",
        "localhost:9090",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        ":9090",
        "127.0.0.1",
        "::1:9090",
        "[::1%lo]:9090",
        "10.0.0.1:9090",
        "[::]:9090",
        "127.0.0.01:9090",
        "garbage",
    ],
)
def test_metrics_refused(addr: str) -> None:
    r = refusal(cfg(*DOMAIN, f"--metrics-listen={addr}"))
    assert r.msg == "refusing to start: invalid --metrics-listen address"
    assert r.fields["reason"] == (
        "relay: metrics listener bind address must be a loopback IP literal"
    )
    assert r.fields["addr"] == addr


# --- 10. listener addresses -------------------------------------------------------------------


@pytest.mark.parametrize("addr", [":0", "garbage", ":http", "1.2.3.4:99999", "::1:80"])
def test_invalid_insecure_listener(addr: str) -> None:
    r = refusal(cfg(f"--insecure-listen={addr}"))
    assert r.msg == "refusing to start: invalid listener address"
    assert r.fields["addr"] == addr
    assert r.fields["reason"].startswith("relay: ")


@pytest.mark.parametrize("flag", ["--https-listen", "--http-listen"])
def test_invalid_domain_listeners(flag: str) -> None:
    r = refusal(cfg(*DOMAIN, f"{flag}=:0"))
    assert r.msg == "refusing to start: invalid listener address"
    assert r.fields["addr"] == ":0"


def test_domain_mode_ignores_unused_insecure_default() -> None:
    # The TLS listener flags are unused in insecure mode, so they are not parsed there.
    boot(cfg(*INSECURE))


def test_metrics_checked_before_listeners() -> None:
    r = refusal(cfg("--insecure-listen=:0", "--metrics-listen=0.0.0.0:1"))
    assert r.msg == "refusing to start: invalid --metrics-listen address"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        (":8080", ("", 8080)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:443", ("::1", 443)),
        ("[::]:1", ("::", 1)),
        ("example.com:65535", ("example.com", 65535)),
        ("0.0.0.0:080", ("0.0.0.0", 80)),
    ],
)
def test_parse_listen_address(addr: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(addr) == expected


@pytest.mark.parametrize(
    "addr",
    [
        "",
        ":",
        ":0",
        ":65536",
        ":+80",
        ": 80",
        ":8_0",
        "8080",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[::1:80",
        "[::1]]:80",
        "a[b:80",
        "host:\u0661\u0662",
    ],
)
def test_parse_listen_address_errors(addr: str) -> None:
    with pytest.raises(ValueError, match=r"^relay: "):
        parse_listen_address(addr)


# --- order and the refusal type ---------------------------------------------------------------


def test_order_mode_before_everything() -> None:
    r = refusal(cfg("--max-connections=0"), {"PYRYCODE_RELAY_PRODUCTION": "bad"})
    assert r.msg.startswith("either --domain")


def test_order_exclusive_before_max_connections() -> None:
    r = refusal(cfg(*INSECURE, "--http-listen=:80", "--max-connections=0"))
    assert "mutually exclusive" in r.msg


def test_order_max_connections_before_env() -> None:
    r = refusal(cfg(*DOMAIN, "--max-connections=0"), {"PYRYCODE_RELAY_PRODUCTION": "bad"})
    assert r.msg == "refusing to start: invalid --max-connections"


def test_order_multi_instance_before_production() -> None:
    r = refusal(cfg(*INSECURE), {"FLY_APP_NAME": "x", **PROD})
    assert r.msg == "refusing to start: multi-instance deploy detected"


def test_order_insecure_production_before_root() -> None:
    r = refusal(cfg(*INSECURE), PROD, euid=0)
    assert r.fields["reason"].startswith("relay: --insecure-listen")


def test_order_caps_before_metrics() -> None:
    r = refusal(cfg(*DOMAIN, "--metrics-listen=0.0.0.0:1"), proc_status=None)
    assert r.msg == "refusing to start: unexpected Linux capabilities"


def test_refusal_rejects_unlisted_log_keys() -> None:
    with pytest.raises(ValueError):
        Refusal("refusing to start: x", {"token": "nope"})
    r = Refusal("refusing to start: x", {"reason": "r"})
    assert (r.msg, r.fields, r.exit_code) == ("refusing to start: x", {"reason": "r"}, 2)


# -- TLS modes (static certificates, PROXY allowlist) ----------------------------------

STATIC = ["--tls-cert", "/c.pem", "--tls-key", "/k.pem"]


def test_static_certificates_boot_without_domain() -> None:
    boot(cfg(*STATIC, "--https-listen=:8443"))
    boot(cfg(*STATIC, *DOMAIN))


@pytest.mark.parametrize("half", [["--tls-cert", "/c.pem"], ["--tls-key", "/k.pem"]])
def test_static_needs_both_files(half: list[str]) -> None:
    r = refusal(cfg(*half))
    assert r.msg == "refusing to start: --tls-cert and --tls-key must be given together"


@pytest.mark.parametrize(
    "flag",
    ["--http-listen=:80", "--cert-cache=/x", "--acme-directory=https://a/", "--acme-email=a@b"],
)
def test_static_refuses_acme_only_flags(flag: str) -> None:
    r = refusal(cfg(*STATIC, flag))
    assert r.msg.startswith("refusing to start: --tls-cert/--tls-key are mutually exclusive")
    assert r.fields["value"] == flag.split("=", 1)[0]


def test_proxy_allow_needs_proxy_protocol_and_valid_cidrs() -> None:
    r = refusal(cfg(*DOMAIN, "--proxy-protocol-allow=10.0.0.0/8"))
    assert r.msg == "refusing to start: invalid --proxy-protocol-allow"
    r = refusal(cfg(*DOMAIN, "--https-proxy-protocol", "--proxy-protocol-allow=10.0.0.0/8,nope"))
    assert "'nope'" in r.fields["reason"]
    boot(cfg(*DOMAIN, "--https-proxy-protocol", "--proxy-protocol-allow=10.0.0.0/8, ::1/128"))


def test_insecure_refuses_proxy_allow() -> None:
    assert refusal(cfg(*INSECURE, "--proxy-protocol-allow=10.0.0.0/8")).exit_code == 2


# -- what a validated configuration binds --------------------------------------------------


def test_the_listeners_of_each_mode_come_back_parsed() -> None:
    insecure = boot(cfg(*INSECURE, "--metrics-listen=[::1]:9100"))
    assert (insecure.main.host, insecure.main.port, insecure.acme) == ("127.0.0.1", 8080, None)
    assert insecure.metrics is not None and insecure.metrics.port == 9100
    assert insecure.proxy_allow == ()
    acme = boot(cfg(*DOMAIN, "--https-listen=:8443", "--http-listen=:8080", "--metrics-listen="))
    assert (acme.main.text, acme.acme, acme.metrics) == (
        ":8443",
        ListenAddress(":8080", "", 8080),
        None,
    )
    static = boot(
        cfg(*STATIC, "--https-proxy-protocol", "--proxy-protocol-allow=10.0.0.0/8, 192.0.2.1")
    )
    assert static.acme is None
    assert [str(n) for n in static.proxy_allow] == ["10.0.0.0/8", "192.0.2.1/32"]
