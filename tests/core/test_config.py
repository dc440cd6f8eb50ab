from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrycode_relay.core.config import (
    Config,
    ConfigError,
    HelpRequested,
    env_var_for,
    flag_names,
    log_format_hint,
    parse_args,
    parse_size,
    usage,
)
from pyrycode_relay.core.duration import format_duration, parse_duration

HOME = {"HOME": "/home/relay"}


def parse(*argv: str, env: dict[str, str] | None = None) -> Config:
    return parse_args(list(argv), HOME if env is None else env)


def error(*argv: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(*argv, env=env)
    return info.value


# --- defaults ---------------------------------------------------------------------------------


def test_defaults() -> None:
    c = parse()
    assert c.domain == ""
    assert c.cert_cache == "/home/relay/.pyrycode-relay/certs"
    assert c.insecure_listen == ""
    assert c.https_listen == ":443"
    assert c.http_listen == ":80"
    assert c.metrics_listen == "127.0.0.1:9090"
    assert c.trust_x_forwarded_for is False
    assert c.https_proxy_protocol is False
    assert c.max_connections == 1000
    assert c.version is False
    assert c.grace_period == 30.0
    assert c.heartbeat_interval == 30.0
    assert c.heartbeat_timeout == 30.0
    assert c.conflict_probe_timeout == 10.0
    assert c.max_phones_per_server == 16
    assert c.max_message_bytes == 262144
    assert c.message_read_timeout == 30.0
    assert c.write_timeout == 10.0
    assert c.handshake_timeout == 5.0
    assert c.phone_outbox_bytes == 4194304
    assert c.rate_limit_burst == 20
    assert c.rate_limit_interval == 6.0
    assert c.drain_timeout == 10.0
    assert c.push_burst == 6
    assert c.push_interval == 10.0
    assert c.push_max_in_flight == 32
    assert c.max_buffered_bytes == 64 * 1024 * 1024
    assert c.max_connections_per_ip == 0
    assert c.proxy_protocol_allow == ""
    assert c.tls_cert == ""
    assert c.tls_key == ""
    assert c.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert c.acme_email == ""
    assert c.acme_ca_bundle == ""
    assert c.fcm_endpoint == "https://fcm.googleapis.com"
    assert c.log_format == "text"
    assert c.log_level == "info"
    assert c.cluster_redis == ""
    assert c.instance_id == ""
    assert c.cluster_lease == 10.0
    assert c.explicit == frozenset()


def test_every_flag_has_a_field() -> None:
    fields = {f.name for f in dataclasses.fields(Config)} - {"explicit"}
    assert fields == {n.replace("-", "_") for n in flag_names()}


def test_config_is_frozen() -> None:
    c = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.domain = "x"  # type: ignore[misc]


@pytest.mark.parametrize("env", [{}, {"HOME": ""}])
def test_cert_cache_without_home(env: dict[str, str]) -> None:
    assert parse(env=env).cert_cache == ".pyrycode-relay/certs"


# --- syntax -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--domain", "relay.example"],
        ["--domain=relay.example"],
        ["-domain", "relay.example"],
        ["-domain=relay.example"],
    ],
)
def test_value_syntax_forms(argv: list[str]) -> None:
    c = parse(*argv)
    assert c.domain == "relay.example"
    assert c.explicit == frozenset({"domain"})


def test_value_may_contain_equals_and_start_with_dash() -> None:
    assert parse("--acme-email=a=b@example").acme_email == "a=b@example"
    assert parse("--domain", "-weird").domain == "-weird"


def test_empty_value_with_equals() -> None:
    c = parse("--metrics-listen=")
    assert c.metrics_listen == ""
    assert "metrics-listen" in c.explicit


@pytest.mark.parametrize("form", ["--version", "-version"])
def test_bare_boolean_is_true(form: str) -> None:
    assert parse(form).version is True


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_boolean_true_spellings(text: str) -> None:
    assert parse(f"--trust-x-forwarded-for={text}").trust_x_forwarded_for is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_boolean_false_spellings(text: str) -> None:
    c = parse(f"--https-proxy-protocol={text}")
    assert c.https_proxy_protocol is False
    assert "https-proxy-protocol" in c.explicit


@pytest.mark.parametrize("text", ["yes", "", "tRUE", "2"])
def test_boolean_bad_value(text: str) -> None:
    err = error(f"--https-proxy-protocol={text}")
    assert str(err).startswith(f'invalid value "{text}" for flag --https-proxy-protocol:')


def test_boolean_never_consumes_next_argument() -> None:
    err = error("--https-proxy-protocol", "false")
    assert str(err) == 'unexpected argument "false"'
    c = parse("--https-proxy-protocol", "--domain", "d")
    assert c.https_proxy_protocol is True
    assert c.domain == "d"


def test_last_occurrence_wins() -> None:
    assert parse("--domain", "a", "--domain=b").domain == "b"


@pytest.mark.parametrize(
    ("arg", "named"), [("--foo", "--foo"), ("-foo", "-foo"), ("--foo=secret", "--foo")]
)
def test_unknown_flag_named_as_typed_without_its_value(arg: str, named: str) -> None:
    assert str(error(arg)) == f"flag provided but not defined: {named}"


@pytest.mark.parametrize(
    ("argv", "env", "hint"),
    [
        ([], {}, "text"),
        (["--log-format=json", "--bogus"], {}, "json"),
        (["--bogus", "-log-format", "json"], {}, "json"),
        (["--bogus"], {"PYRYCODE_RELAY_LOG_FORMAT": "json"}, "json"),
        (["--log-format=text"], {"PYRYCODE_RELAY_LOG_FORMAT": "json"}, "text"),
        (["--log-format=xml"], {}, "text"),
        (["--log-format"], {}, "text"),
        (["--", "--log-format=json"], {}, "text"),
    ],
)
def test_log_format_hint_reads_a_refused_command_line(
    argv: list[str], env: dict[str, str], hint: str
) -> None:
    assert log_format_hint(argv, env) == hint


@pytest.mark.parametrize("arg", ["---domain", "--=x", "-=x"])
def test_bad_flag_syntax(arg: str) -> None:
    err = error(arg)
    assert str(err) == f"bad flag syntax: {arg}"


@pytest.mark.parametrize("arg", ["-h", "--help", "-help"])
def test_help(arg: str) -> None:
    with pytest.raises(HelpRequested):
        parse(arg)


def test_missing_value_for_non_boolean() -> None:
    err = error("--domain")
    assert str(err) == "flag needs an argument: --domain"
    err = error("-grace-period")
    assert str(err) == "flag needs an argument: --grace-period"


def test_double_dash_ends_flags() -> None:
    assert parse("--domain", "d", "--").domain == "d"
    err = error("--", "--domain", "d")
    assert str(err) == 'unexpected argument "--domain"'


@pytest.mark.parametrize("argv", [["serve"], ["--domain", "d", "extra"], ["-"]])
def test_positional_argument_refused(argv: list[str]) -> None:
    err = error(*argv)
    assert str(err).startswith("unexpected argument ")


def test_errors_are_one_line() -> None:
    err = error("--grace-period=a\nb")
    assert "\n" not in str(err)
    assert str(err) == 'invalid value "a\\nb" for flag --grace-period: not a duration'


# --- environment ------------------------------------------------------------------------------


def test_env_var_names() -> None:
    assert env_var_for("max-connections") == "PYRYCODE_RELAY_MAX_CONNECTIONS"
    assert env_var_for("trust-x-forwarded-for") == "PYRYCODE_RELAY_TRUST_X_FORWARDED_FOR"


def test_env_fallback_for_each_kind() -> None:
    env = {
        "PYRYCODE_RELAY_DOMAIN": "env.example",
        "PYRYCODE_RELAY_MAX_CONNECTIONS": "7",
        "PYRYCODE_RELAY_GRACE_PERIOD": "1m",
        "PYRYCODE_RELAY_PHONE_OUTBOX_BYTES": "1MiB",
        "PYRYCODE_RELAY_TRUST_X_FORWARDED_FOR": "true",
    }
    c = parse(env=env)
    assert c.domain == "env.example"
    assert c.max_connections == 7
    assert c.grace_period == 60.0
    assert c.phone_outbox_bytes == 1024 * 1024
    assert c.trust_x_forwarded_for is True
    assert c.explicit == frozenset(
        {"domain", "max-connections", "grace-period", "phone-outbox-bytes", "trust-x-forwarded-for"}
    )


def test_command_line_wins_over_env() -> None:
    env = {"PYRYCODE_RELAY_DOMAIN": "env.example", "PYRYCODE_RELAY_MAX_CONNECTIONS": "7"}
    c = parse("--domain", "cli.example", env=env)
    assert c.domain == "cli.example"
    assert c.max_connections == 7


def test_command_line_wins_even_over_invalid_env() -> None:
    env = {"PYRYCODE_RELAY_GRACE_PERIOD": "garbage"}
    assert parse("--grace-period=5s", env=env).grace_period == 5.0


def test_empty_env_sets_string_flag_to_empty() -> None:
    c = parse(env={"PYRYCODE_RELAY_METRICS_LISTEN": ""})
    assert c.metrics_listen == ""
    assert c.explicit == frozenset({"metrics-listen"})


def test_empty_env_ignored_for_non_string_flags() -> None:
    env = {
        "PYRYCODE_RELAY_MAX_CONNECTIONS": "",
        "PYRYCODE_RELAY_HTTPS_PROXY_PROTOCOL": "",
        "PYRYCODE_RELAY_GRACE_PERIOD": "",
        "PYRYCODE_RELAY_MAX_MESSAGE_BYTES": "",
    }
    c = parse(env=env)
    assert c.max_connections == 1000
    assert c.https_proxy_protocol is False
    assert c.explicit == frozenset()


def test_non_flag_env_vars_and_version_ignored() -> None:
    env = {
        "PYRYCODE_RELAY_PRODUCTION": "1",
        "PYRYCODE_RELAY_SINGLE_INSTANCE": "garbage",
        "PYRYCODE_RELAY_FCM_CREDENTIALS": "{}",
        "PYRYCODE_RELAY_VERSION": "true",
        "PYRYCODE_RELAY_NOT_A_FLAG": "x",
    }
    c = parse(env=env)
    assert c.version is False
    assert c.explicit == frozenset()


def test_invalid_env_value_is_withheld() -> None:
    err = error(env={"PYRYCODE_RELAY_GRACE_PERIOD": "s3cr3t"})
    assert str(err) == (
        "invalid value for flag --grace-period from PYRYCODE_RELAY_GRACE_PERIOD "
        "(value withheld): not a duration"
    )
    assert "s3cr3t" not in str(err)


def test_invalid_env_unit_is_withheld() -> None:
    err = error(env={"PYRYCODE_RELAY_GRACE_PERIOD": "5secret"})
    assert "secret" not in str(err)


def test_env_range_error_is_withheld() -> None:
    err = error(env={"PYRYCODE_RELAY_LOG_LEVEL": "s3cr3t"})
    assert "s3cr3t" not in str(err)
    assert "--log-level" in str(err)


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("500us", 0.0005),
        ("500\u00b5s", 0.0005),
        ("500\u03bcs", 0.0005),
        ("10ns", 1e-8),
        ("1h2m3s4ms5us6ns", 3723.004005006),
        ("0.2", 0.2),
        ("5", 5.0),
        (".5", 0.5),
        ("1.", 1.0),
        ("0", 0.0),
        ("+2s", 2.0),
        ("-0s", 0.0),
        (".5m", 30.0),
    ],
)
def test_duration_forms(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-12)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "s", ".s", "1m30", "5 s", "1e3", "inf", "nan", "1sec", "1d", "5s ", "--5s", "."],
)
def test_duration_errors(text: str) -> None:
    err = error(f"--write-timeout={text}")
    assert str(err).startswith(f"invalid value {_q(text)} for flag --write-timeout: not a duration")


def test_negative_duration() -> None:
    err = error("--grace-period=-1s")
    assert str(err) == 'invalid value "-1s" for flag --grace-period: negative duration not allowed'
    assert "negative" in str(error("--grace-period=-0.5"))


def test_duration_out_of_range() -> None:
    assert "out of range" in str(error("--grace-period=3000000h"))


def test_duration_flag_via_cli() -> None:
    assert parse("--heartbeat-interval", "250ms").heartbeat_interval == 0.25


@given(
    st.tuples(
        st.integers(0, 100),
        st.integers(0, 59),
        st.integers(0, 59),
        st.integers(0, 999),
        st.integers(0, 999),
        st.integers(0, 999),
    )
)
def test_duration_components_sum(parts: tuple[int, int, int, int, int, int]) -> None:
    h, m, s, ms, us, ns = parts
    total_ns = ((h * 60 + m) * 60 + s) * 10**9 + ms * 10**6 + us * 10**3 + ns
    assert parse_duration(f"{h}h{m}m{s}s{ms}ms{us}us{ns}ns") == total_ns / 1e9


@given(st.integers(0, 10**15))
def test_duration_format_round_trip(ns: int) -> None:
    seconds = ns / 1e9
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (30, "30s"), (90, "1m30s"), (3600, "1h0m0s"), (0.25, "250ms"), (1.5, "1.5s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- sizes and ints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("262144", 262144), ("1KiB", 1024), ("4MiB", 4194304), ("1GiB", 1 << 30), ("0", 0)],
)
def test_size_forms(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["1KB", "1MB", "1.5MiB", "-1", "1 MiB", "1kib", "MiB", "", "1_0"])
def test_size_errors(text: str) -> None:
    err = error(f"--max-message-bytes={text}")
    assert str(err).startswith(f"invalid value {_q(text)} for flag --max-message-bytes: not a size")


def test_size_out_of_range() -> None:
    assert "out of range" in str(error("--max-buffered-bytes=99999999999GiB"))


@pytest.mark.parametrize("text", ["abc", "1.0", "0x10", "1_000", " 5", "", "1e3"])
def test_int_errors(text: str) -> None:
    err = error(f"--max-connections={text}")
    assert str(err) == f"invalid value {_q(text)} for flag --max-connections: not an integer"


def test_int_out_of_range() -> None:
    assert "out of range" in str(error("--push-burst=99999999999999999999"))


def test_max_connections_range_is_left_to_boot() -> None:
    assert parse("--max-connections=0").max_connections == 0
    assert parse("--max-connections=-1").max_connections == -1
    assert parse("--max-connections=+5").max_connections == 5


# --- range checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag",
    [
        "heartbeat-interval",
        "heartbeat-timeout",
        "conflict-probe-timeout",
        "message-read-timeout",
        "write-timeout",
        "handshake-timeout",
        "drain-timeout",
        "rate-limit-interval",
        "push-interval",
        "cluster-lease",
    ],
)
def test_positive_durations(flag: str) -> None:
    assert str(error(f"--{flag}=0")) == f'invalid value "0" for flag --{flag}: must be > 0'
    assert str(error(f"--{flag}=0s")).endswith("must be > 0")
    parse(f"--{flag}=1ns")


@pytest.mark.parametrize(
    "flag",
    [
        "max-phones-per-server",
        "max-message-bytes",
        "phone-outbox-bytes",
        "max-buffered-bytes",
        "push-burst",
        "push-max-in-flight",
    ],
)
def test_at_least_one(flag: str) -> None:
    assert str(error(f"--{flag}=0")) == f'invalid value "0" for flag --{flag}: must be >= 1'
    parse(f"--{flag}=1")


@pytest.mark.parametrize("flag", ["rate-limit-burst", "max-connections-per-ip"])
def test_non_negative_ints(flag: str) -> None:
    assert str(error(f"--{flag}=-1")) == f'invalid value "-1" for flag --{flag}: must be >= 0'
    assert getattr(parse(f"--{flag}=0"), flag.replace("-", "_")) == 0


def test_grace_period_may_be_zero() -> None:
    assert parse("--grace-period=0").grace_period == 0.0


def test_log_format_and_level() -> None:
    c = parse("--log-format=json", "--log-level=debug")
    assert (c.log_format, c.log_level) == ("json", "debug")
    for level in ("info", "warn", "error"):
        assert parse(f"--log-level={level}").log_level == level
    assert str(error("--log-format=xml")) == (
        'invalid value "xml" for flag --log-format: must be one of text, json'
    )
    assert str(error("--log-level=INFO")).endswith("must be one of debug, info, warn, error")


# --- usage ------------------------------------------------------------------------------------


def test_usage_lists_every_flag_with_default() -> None:
    text = usage()
    for name in flag_names():
        assert f"--{name} " in text
    assert "(default 30s)" in text
    assert "(default 4MiB)" in text
    assert '(default "127.0.0.1:9090")' in text
    assert "(default 1000)" in text


def _q(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)
