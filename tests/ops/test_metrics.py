from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyrycode_relay.core.stats import (
    CAP_SCOPES,
    ENDPOINTS,
    LIFETIME_BUCKETS,
    REGISTER_FAILURE_KINDS,
    UPGRADE_BUCKETS,
    UPGRADE_OUTCOMES,
    RelayStats,
)
from pyrycode_relay.ops.metrics import CONTENT_TYPE, BuildInfo, MetricsExporter

BUILD = BuildInfo("1.2.3", "3.12.7", "cpython", "uvloop", "0123456789ab")
BUILD_SERIES = (
    'pyrycode_relay_build_info{event_loop="uvloop",implementation="cpython",'
    'python="3.12.7",revision="0123456789ab",version="1.2.3"}'
)
HISTOGRAMS = {
    "pyrycode_relay_ws_upgrade_duration_seconds": UPGRADE_BUCKETS,
    "pyrycode_relay_ws_connection_duration_seconds": LIFETIME_BUCKETS,
}


class Live:
    def __init__(self) -> None:
        self.binaries = 0
        self.phones = 0
        self.outbox = 0

    def counts(self) -> tuple[int, int]:
        return self.binaries, self.phones

    def outbox_bytes(self) -> int:
        return self.outbox


def setup() -> tuple[RelayStats, Live, MetricsExporter]:
    stats, live = RelayStats(), Live()
    return stats, live, MetricsExporter(stats, live.counts, live.outbox_bytes, build=BUILD)


def samples(body: bytes) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line."""
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            assert series not in out
            out[series] = float(value)
    return out


def expected_series() -> set[str]:
    s = {
        "pyrycode_relay_connected_binaries",
        "pyrycode_relay_connected_phones",
        'pyrycode_relay_frames_forwarded_total{direction="phone_to_binary"}',
        'pyrycode_relay_frames_forwarded_total{direction="binary_to_phone"}',
        "pyrycode_relay_grace_expiries_total",
        "pyrycode_relay_takeovers_total",
        "pyrycode_relay_reclaim_evictions_total",
        "pyrycode_relay_outbox_bytes",
        "promhttp_metric_handler_requests_in_flight",
    }
    s |= {
        f'pyrycode_relay_ws_upgrade_attempts_total{{endpoint="{e}",outcome="{o}"}}'
        for e in ENDPOINTS
        for o in UPGRADE_OUTCOMES
    }
    s |= {f'pyrycode_relay_register_failures_total{{kind="{k}"}}' for k in REGISTER_FAILURE_KINDS}
    s |= {f'pyrycode_relay_heartbeat_closes_total{{endpoint="{e}"}}' for e in ENDPOINTS}
    s |= {f'pyrycode_relay_conn_cap_rejections_total{{scope="{c}"}}' for c in CAP_SCOPES}
    s |= {f'promhttp_metric_handler_requests_total{{code="{c}"}}' for c in ("200", "500", "503")}
    s.add(BUILD_SERIES)
    for name, bounds in HISTOGRAMS.items():
        for e in ENDPOINTS:
            les = [str(float(b)) for b in bounds] + ["+Inf"]
            s |= {f'{name}_bucket{{endpoint="{e}",le="{le}"}}' for le in les}
            s |= {f'{name}_sum{{endpoint="{e}"}}', f'{name}_count{{endpoint="{e}"}}'}
    return s


def test_every_series_exists_at_zero_and_nothing_else() -> None:
    _, _, exp = setup()
    body, ctype = exp.render()
    assert ctype == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    got = samples(body)
    assert set(got) == expected_series()
    assert len([k for k in got if "ws_upgrade_attempts" in k]) == 12
    for series, value in got.items():
        # the scrape being served is in flight, build_info is 1; everything else starts at 0
        ones = ("promhttp_metric_handler_requests_in_flight", BUILD_SERIES)
        want = 1.0 if series in ones else 0.0
        assert value == want, series


def test_no_default_collectors_created_or_double_suffix() -> None:
    _, _, exp = setup()
    text = exp.render()[0].decode()
    for bad in ("process_", "python_", "_created", "_total_total", "gc_"):
        assert bad not in text
    assert "# TYPE pyrycode_relay_grace_expiries_total counter" in text
    assert "# TYPE pyrycode_relay_outbox_bytes gauge" in text
    # the text parses as valid exposition
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "pyrycode_relay_ws_upgrade_attempts" in names


def test_values_follow_stats_at_scrape_time() -> None:
    stats, live, exp = setup()
    stats.frames_phone_to_binary += 3
    stats.frames_binary_to_phone += 5
    stats.grace_expiries += 1
    stats.takeovers += 2
    stats.reclaim_evictions += 4
    stats.upgrade("client", "reject_404")
    stats.upgrade("client", "reject_404")
    stats.register_failures["no_server"] += 2
    stats.heartbeat_closes["server"] += 1
    stats.cap_rejections["per_ip"] += 7
    live.binaries, live.phones, live.outbox = 2, 9, 4096
    got = samples(exp.render()[0])
    assert got["pyrycode_relay_connected_binaries"] == 2
    assert got["pyrycode_relay_connected_phones"] == 9
    assert got["pyrycode_relay_outbox_bytes"] == 4096
    assert got['pyrycode_relay_frames_forwarded_total{direction="phone_to_binary"}'] == 3
    assert got['pyrycode_relay_frames_forwarded_total{direction="binary_to_phone"}'] == 5
    assert got["pyrycode_relay_grace_expiries_total"] == 1
    assert got["pyrycode_relay_takeovers_total"] == 2
    assert got["pyrycode_relay_reclaim_evictions_total"] == 4
    key = 'pyrycode_relay_ws_upgrade_attempts_total{endpoint="client",outcome="reject_404"}'
    assert got[key] == 2
    assert got['pyrycode_relay_register_failures_total{kind="no_server"}'] == 2
    assert got['pyrycode_relay_heartbeat_closes_total{endpoint="server"}'] == 1
    assert got['pyrycode_relay_conn_cap_rejections_total{scope="per_ip"}'] == 7
    assert got['pyrycode_relay_conn_cap_rejections_total{scope="global"}'] == 0


def test_handler_counters_like_promhttp() -> None:
    _, _, exp = setup()
    first = samples(exp.render()[0])
    second = samples(exp.render()[0])
    assert first['promhttp_metric_handler_requests_total{code="200"}'] == 0
    assert second['promhttp_metric_handler_requests_total{code="200"}'] == 1
    assert second["promhttp_metric_handler_requests_in_flight"] == 1
    assert exp.in_flight == 0


def test_failed_scrape_counts_500() -> None:
    stats = RelayStats()
    calls = 0

    def counts() -> tuple[int, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return 0, 0

    exp = MetricsExporter(stats, counts, lambda: 0, build=BUILD)
    with pytest.raises(RuntimeError):
        exp.render()
    got = samples(exp.render()[0])
    assert got['promhttp_metric_handler_requests_total{code="500"}'] == 1
    assert got['promhttp_metric_handler_requests_total{code="200"}'] == 0
    assert exp.in_flight == 0


def test_default_registry_untouched() -> None:
    before = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    setup()[2].render()
    assert b"pyrycode_relay" not in before
    assert b"pyrycode_relay" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_push_series_only_when_push_is_on() -> None:
    from pyrycode_relay.ops.push import OUTCOMES

    stats, live = RelayStats(), Live()
    outcomes = dict.fromkeys(OUTCOMES, 0)
    exp = MetricsExporter(stats, live.counts, live.outbox_bytes, outcomes, build=BUILD)
    push = {f'pyrycode_relay_push_wakes_total{{outcome="{o}"}}' for o in OUTCOMES}
    got = samples(exp.render()[0])
    assert set(got) == expected_series() | push
    assert all(got[s] == 0 for s in push)
    outcomes["sent"] += 2
    outcomes["dropped"] += 1
    got = samples(exp.render()[0])
    assert got['pyrycode_relay_push_wakes_total{outcome="sent"}'] == 2
    assert got['pyrycode_relay_push_wakes_total{outcome="dropped"}'] == 1
    # push off (the default): the family does not exist at all
    _, _, off = setup()
    assert b"push_wakes" not in off.render()[0]


def test_asyncio_tasks_gauge_only_with_a_source() -> None:
    stats = RelayStats()
    without = samples(MetricsExporter(stats, lambda: (0, 0), lambda: 0, build=BUILD).render()[0])
    assert "pyrycode_relay_asyncio_tasks" not in without
    exp = MetricsExporter(stats, lambda: (0, 0), lambda: 0, build=BUILD, tasks=lambda: 7)
    text = exp.render()[0]
    assert samples(text)["pyrycode_relay_asyncio_tasks"] == 7
    assert b"# TYPE pyrycode_relay_asyncio_tasks gauge" in text


def test_histograms_are_cumulative_with_sum_and_count() -> None:
    stats, _, exp = setup()
    up = stats.upgrade_seconds["client"]
    for value in (0.0004, 0.0005, 0.003, 7.0, 11.0):  # 0.0005 is `le` its own bound
        up.observe(value)
    stats.connection_seconds["server"].observe(90.0)
    got = samples(exp.render()[0])
    name = "pyrycode_relay_ws_upgrade_duration_seconds"
    bucket = f'{name}_bucket{{endpoint="client",le='
    assert got[bucket + '"0.0005"}'] == 2
    assert got[bucket + '"0.001"}'] == 2
    assert got[bucket + '"0.005"}'] == 3
    assert got[bucket + '"5.0"}'] == 3
    assert got[bucket + '"10.0"}'] == 4
    assert got[bucket + '"+Inf"}'] == 5
    assert got[f'{name}_count{{endpoint="client"}}'] == 5
    assert got[f'{name}_sum{{endpoint="client"}}'] == pytest.approx(18.0039)
    assert got[f'{name}_count{{endpoint="server"}}'] == 0
    life = "pyrycode_relay_ws_connection_duration_seconds"
    assert got[f'{life}_bucket{{endpoint="server",le="60.0"}}'] == 0
    assert got[f'{life}_bucket{{endpoint="server",le="300.0"}}'] == 1
    assert got[f'{life}_sum{{endpoint="server"}}'] == 90
    assert b"# TYPE pyrycode_relay_ws_connection_duration_seconds histogram" in exp.render()[0]


def test_certificate_expiry_only_once_a_certificate_is_held() -> None:
    stats = RelayStats()
    held: list[float | None] = [None]
    exp = MetricsExporter(
        stats, lambda: (0, 0), lambda: 0, build=BUILD, cert_not_after=lambda: held[0]
    )
    name = "pyrycode_relay_tls_certificate_not_after_seconds"
    assert name not in samples(exp.render()[0])  # ACME has not delivered yet
    held[0] = 1_800_000_000.0
    assert samples(exp.render()[0])[name] == 1_800_000_000
    _, _, insecure = setup()
    assert b"tls_certificate" not in insecure.render()[0]
