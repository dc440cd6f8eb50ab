from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from pyrycode_relay.core.duration import format_duration
from pyrycode_relay.ops.log import ALLOWED_KEYS, Logger, go_quote, millis

T0 = datetime(2026, 11, 22, 16, 7, 30, 123456, tzinfo=UTC)


def make(fmt: str = "text", level: str = "info", at: datetime = T0) -> tuple[Logger, io.StringIO]:
    buf = io.StringIO()
    return Logger(buf, fmt=fmt, level=level, now=lambda: at), buf


def one_line(buf: io.StringIO) -> str:
    out = buf.getvalue()
    assert out.endswith("\n") and out.count("\n") == 1
    return out[:-1]


def test_text_line_shape() -> None:
    log, buf = make()
    log.info("server_claimed", server_id="abc", remote="127.0.0.1")
    assert one_line(buf) == (
        "time=2026-11-22T16:07:30.123Z level=INFO msg=server_claimed server_id=abc remote=127.0.0.1"
    )


def test_text_time_keeps_local_offset_and_truncates_to_millis() -> None:
    tz = timezone(timedelta(hours=-5, minutes=-30))
    log, buf = make(at=datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=tz))
    log.info("starting")
    assert one_line(buf) == "time=2026-01-02T03:04:05.999-05:30 level=INFO msg=starting"


def test_naive_time_is_taken_as_local() -> None:
    log, buf = make(at=datetime(2026, 1, 2, 3, 4, 5))
    log.info("starting")
    assert one_line(buf).startswith("time=2026-01-02T03:04:05.000")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("plain", "plain"),
        ("", '""'),
        ("two words", '"two words"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("tab\there", '"tab\\there"'),
        ("cr\r", '"cr\\r"'),
        ("esc\x1b[0m", '"esc\\x1b[0m"'),
        ("soft\u00adhyphen", '"soft\\u00adhyphen"'),
        ("nbsp\u00a0x", '"nbsp\\u00a0x"'),
        ("café", "café"),
        ("back\\slash", "back\\slash"),  # slog leaves a lone backslash bare
        ("del\x7f", "del\x7f"),  # ... and DEL, which is in encoding/json's safe set
        ("emoji😀", "emoji😀"),
    ],
)
def test_text_value_quoting(value: str, shown: str) -> None:
    log, buf = make()
    log.info("x", reason=value)
    assert one_line(buf).endswith(f" reason={shown}")


def test_msg_is_quoted_like_a_value() -> None:
    log, buf = make()
    log.info("shutdown signal received; draining", signal="SIGTERM")
    assert one_line(buf).endswith('msg="shutdown signal received; draining" signal=SIGTERM')


def test_rate_limited_remote_is_double_quoted() -> None:
    # reference §8.3: remote carries the Go-quoted IP, which the text handler quotes again
    log, buf = make(level="warn")
    log.warn("rate_limited", remote=go_quote("1.2.3.4"))
    log.warn("rate_limited", remote=go_quote(""))
    first, second = buf.getvalue().splitlines()
    assert first.endswith('level=WARN msg=rate_limited remote="\\"1.2.3.4\\""')
    assert second.endswith('msg=rate_limited remote="\\"\\""')


def test_value_conversions_text() -> None:
    log, buf = make()
    log.info(
        "x",
        close_code=1011,
        value=True,
        mode=False,
        version=0.5,
        to=None,
        err=ValueError("relay: phone outbox closed"),
        reason=TimeoutError(),
        duration_ms=1.5,
        addr=["a", "b"],
    )
    assert one_line(buf).endswith(
        ' close_code=1011 value=true mode=false version=0.5 to=""'
        " err=\"relay: phone outbox closed\" reason=TimeoutError duration_ms=2 addr=\"['a', 'b']\""
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_ms_keys_are_integer_milliseconds(fmt: str) -> None:
    log, buf = make(fmt=fmt)
    log.info("x", duration_ms=millis(0.25))
    log.info("x", retry_ms=timedelta(minutes=1, seconds=30))
    log.info("x", wait_ms=12.4996)  # a float is already milliseconds: rounded
    log.info("x", duration_ms=millis(0.0004))
    lines = buf.getvalue().splitlines()
    if fmt == "json":
        got = [json.loads(line) for line in lines]
        assert [got[0]["duration_ms"], got[1]["retry_ms"], got[2]["wait_ms"]] == [250, 90000, 12]
        assert got[3]["duration_ms"] == 0
        assert all(isinstance(g[k], int) for g in got for k in g if k.endswith("_ms"))
    else:
        assert lines[0].endswith(" duration_ms=250")
        assert lines[1].endswith(" retry_ms=90000")
        assert lines[2].endswith(" wait_ms=12")
        assert lines[3].endswith(" duration_ms=0")


def test_the_reference_duration_key_is_gone() -> None:
    # Its Go JSON form was unlabelled nanoseconds; a `*_ms` key says its unit.
    assert "duration" not in ALLOWED_KEYS
    with pytest.raises(ValueError, match="duration"):
        make()[0].info("x", duration=1.5)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1.5, "1.5s"),
        (0.25, "250ms"),
        (1.5e-6, "1.5µs"),
        (1e-7, "100ns"),
        (30, "30s"),
        (90, "1m30s"),
        (3600, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
        (-2, "-2s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("f", "text"),
    [(1.0, "1"), (0.5, "0.5"), (123456.0, "123456"), (1234567.0, "1.234567e+06"), (1e-5, "1e-05")],
)
def test_float_like_go(f: float, text: str) -> None:
    log, buf = make()
    log.info("x", value=f)
    assert one_line(buf).endswith(f" value={text}")


def test_go_quote() -> None:
    assert go_quote("1.2.3.4") == '"1.2.3.4"'
    assert go_quote("") == '""'
    assert go_quote('a"b\\c') == '"a\\"b\\\\c"'
    assert go_quote("\a\b\f\n\r\t\v") == '"\\a\\b\\f\\n\\r\\t\\v"'
    assert go_quote("\x00\x1b\x7f") == '"\\x00\\x1b\\x7f"'
    assert go_quote("\u0085\u00ad\u2028") == '"\\u0085\\u00ad\\u2028"'
    assert go_quote("\U000e0001") == '"\\U000e0001"'
    assert go_quote("é 😀") == '"é 😀"'
    # undecodable bytes (surrogateescape) print as Go prints invalid UTF-8
    assert go_quote(b"\xff".decode("utf-8", "surrogateescape")) == '"\\xff"'


def test_json_line() -> None:
    log, buf = make(fmt="json")
    log.warn(
        "conn_cap_reached",
        path="/v1/client",
        remote="10.0.0.1",
        close_code=4429,
        value=True,
        to=None,
        duration_ms=1500,
        from_="x",
    )
    line = one_line(buf)
    assert line == (
        '{"time":"2026-11-22T16:07:30.123456Z","level":"WARN","msg":"conn_cap_reached",'
        '"path":"/v1/client","remote":"10.0.0.1","close_code":4429,"value":true,"to":null,'
        '"duration_ms":1500,"from":"x"}'
    )
    assert list(json.loads(line)) == [
        "time", "level", "msg", "path", "remote", "close_code", "value", "to", "duration_ms", "from"
    ]  # fmt: skip


def test_json_escaping_stays_valid_and_utf8() -> None:
    log, buf = make(fmt="json")
    tricky = 'q"\\\n\x1b\u2028é' + b"\xff".decode("utf-8", "surrogateescape")
    log.info("x", reason=tricky, value=float("nan"), err=OSError("boom"))
    line = one_line(buf)
    line.encode("utf-8")  # no lone surrogate reaches the stream
    obj = json.loads(line)
    assert obj["reason"] == 'q"\\\n\x1b\u2028é\ufffd'
    assert obj["value"] == "NaN"
    assert obj["err"] == "boom"
    assert "\\u2028" in line and "é" in line


def test_json_time_trims_trailing_zeros() -> None:
    log, buf = make(fmt="json", at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    log.info("x")
    assert json.loads(one_line(buf))["time"] == "2026-01-02T03:04:05Z"


def test_level_filtering() -> None:
    log, buf = make(level="warn")
    log.debug("a")
    log.info("b")
    log.warn("c")
    log.error("d")
    assert [ln.split(" ", 2)[1:] for ln in buf.getvalue().splitlines()] == [
        ["level=WARN", "msg=c"],
        ["level=ERROR", "msg=d"],
    ]
    log, buf = make(level="DEBUG")
    log.debug("a")
    assert "level=DEBUG msg=a" in buf.getvalue()


def test_unknown_key_raises_even_when_filtered() -> None:
    log, buf = make(level="error")
    with pytest.raises(ValueError, match="token"):
        log.info("x", token="secret")
    with pytest.raises(ValueError, match="token"):
        log.error("x", token="secret")
    assert buf.getvalue() == ""


def test_trailing_underscore_is_stripped_once() -> None:
    log, buf = make()
    log.info("x", from_="a", to="b")
    assert one_line(buf).endswith(" from=a to=b")
    with pytest.raises(ValueError):
        log.info("x", from__="a")


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        Logger(io.StringIO(), fmt="xml")
    with pytest.raises(ValueError):
        Logger(io.StringIO(), level="trace")


def test_broken_stream_is_ignored() -> None:
    buf = io.StringIO()
    log = Logger(buf)
    buf.close()
    log.info("x", err="still fine")


def test_allowlist_contents() -> None:
    assert {"from", "remote", "server_id", "scope", "signal", "duration_ms"} <= ALLOWED_KEYS
    assert "token" not in ALLOWED_KEYS and "msg" not in ALLOWED_KEYS
