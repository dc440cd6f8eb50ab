"""Prometheus text exposition of the relay's counters and gauges (reference §8.2, README §3.4).

Owns: the series names, labels and help texts, the build description (`BuildInfo`), and
rendering one scrape. Must never: be called from the data path, use the default registry or its
process/platform/GC collectors, or turn a server-id, IP or token into a label value. The data
path only bumps plain numbers in `RelayStats`; this module reads them at scrape time, so
forwarding a frame never takes a prometheus lock.
"""

from __future__ import annotations

import asyncio
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pyrycode_relay import source_revision
from pyrycode_relay.core.stats import Histogram, RelayStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# promhttp pre-creates these three codes; 503 would only come from an in-flight limit we lack.
_HANDLER_CODES = ("200", "500", "503")


class _RelayCollector(Collector):
    """Builds every family from plain values at scrape time; no state of its own."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._x = exporter

    def collect(self) -> Iterator[Metric]:
        x = self._x
        st = x.stats
        binaries, phones = x.counts()
        families: list[Metric] = []

        def gauge(name: str, doc: str, value: float) -> None:
            families.append(GaugeMetricFamily(name, doc, value=value))

        def counter(
            name: str, doc: str, labels: list[str], rows: dict[tuple[str, ...], int]
        ) -> None:
            # CounterMetricFamily strips a trailing `_total` and exposition adds it back; no
            # `created` timestamp is passed, so no `_created` series is emitted.
            fam = CounterMetricFamily(name, doc, labels=labels)
            for values in sorted(rows):  # client_golang orders series by label values
                fam.add_metric(list(values), rows[values])
            families.append(fam)

        def histogram(name: str, doc: str, by_endpoint: dict[str, Histogram]) -> None:
            fam = HistogramMetricFamily(name, doc, labels=["endpoint"])
            for endpoint in sorted(by_endpoint):
                h = by_endpoint[endpoint]
                # repr: the `le` text prometheus_client's own histograms write (1.0, 0.0025)
                bounds = [repr(float(b)) for b in h.bounds] + ["+Inf"]
                fam.add_metric(
                    [endpoint], list(zip(bounds, accumulate(h.counts), strict=True)), h.total
                )
            families.append(fam)

        build = x.build
        build_info = GaugeMetricFamily(
            "pyrycode_relay_build_info",
            "Always 1; the labels say what is running.",
            labels=["version", "revision", "python", "implementation", "event_loop"],
        )
        build_info.add_metric(
            [build.version, build.revision, build.python, build.implementation, build.loop], 1
        )
        families.append(build_info)
        histogram(
            "pyrycode_relay_ws_upgrade_duration_seconds",
            "Seconds from an accepted connection to its 101 written, by endpoint.",
            st.upgrade_seconds,
        )
        histogram(
            "pyrycode_relay_ws_connection_duration_seconds",
            "Seconds from the 101 to the end of the WebSocket, by endpoint.",
            st.connection_seconds,
        )
        if x.cert_not_after is not None:  # a TLS mode: once a certificate is held
            not_after = x.cert_not_after()
            if not_after is not None:
                gauge(
                    "pyrycode_relay_tls_certificate_not_after_seconds",
                    "Expiry (notAfter) of the TLS certificate being served, in Unix seconds.",
                    not_after,
                )
        gauge(
            "promhttp_metric_handler_requests_in_flight",
            "Current number of scrapes being served.",
            x.in_flight,
        )
        counter(
            "promhttp_metric_handler_requests_total",
            "Total number of scrapes by HTTP status code.",
            ["code"],
            {(c,): x.handler_requests[c] for c in _HANDLER_CODES},
        )
        gauge(
            "pyrycode_relay_connected_binaries",
            "Binaries currently connected (binaries in their grace period excluded).",
            binaries,
        )
        gauge("pyrycode_relay_connected_phones", "Phones currently connected.", phones)
        counter(
            "pyrycode_relay_frames_forwarded_total",
            "Frames delivered, by direction. Close notices are not counted.",
            ["direction"],
            {
                ("phone_to_binary",): st.frames_phone_to_binary,
                ("binary_to_phone",): st.frames_binary_to_phone,
            },
        )
        counter(
            "pyrycode_relay_grace_expiries_total",
            "Grace-period timers that actually evicted a server-id.",
            [],
            {(): st.grace_expiries},
        )
        counter(
            "pyrycode_relay_ws_upgrade_attempts_total",
            "WebSocket upgrade attempts by endpoint and final outcome.",
            ["endpoint", "outcome"],
            {tuple(k): v for k, v in st.upgrade_attempts.items()},
        )
        counter(
            "pyrycode_relay_register_failures_total",
            "Registration failures by kind, counted with the matching reject outcome.",
            ["kind"],
            {(k,): v for k, v in st.register_failures.items()},
        )
        counter(
            "pyrycode_relay_takeovers_total",
            "Binary claims that replaced a dead incumbent holding the same server-id.",
            [],
            {(): st.takeovers},
        )
        counter(
            "pyrycode_relay_reclaim_evictions_total",
            "Phones closed 4404 because a binary reclaimed (grace) or took over their server-id.",
            [],
            {(): st.reclaim_evictions},
        )
        counter(
            "pyrycode_relay_heartbeat_closes_total",
            "Connections closed because a heartbeat ping went unanswered, by endpoint.",
            ["endpoint"],
            {(e,): v for e, v in st.heartbeat_closes.items()},
        )
        counter(
            "pyrycode_relay_conn_cap_rejections_total",
            "Upgrade requests refused with 503 by a connection cap, by scope.",
            ["scope"],
            {(s,): v for s, v in st.cap_rejections.items()},
        )
        if x.push_outcomes is not None:  # only when push is configured (reference §12)
            counter(
                "pyrycode_relay_push_wakes_total",
                "Push-wake requests by outcome.",
                ["outcome"],
                {(o,): v for o, v in x.push_outcomes.items()},
            )
        gauge(
            "pyrycode_relay_outbox_bytes",
            "Bytes queued in all phone outboxes together.",
            x.outbox_bytes(),
        )
        if x.cluster is not None:  # only in cluster mode (README §5)
            c = x.cluster()
            counter(
                "pyrycode_relay_cluster_bus_messages_total",
                "Messages this instance put on, or took off, the cluster bus.",
                ["direction"],
                {("publish",): c.published, ("receive",): c.received},
            )
            gauge(
                "pyrycode_relay_cluster_remote_phones",
                "Phones on this instance whose binary is on another instance.",
                c.remote_phones,
            )
            gauge(
                "pyrycode_relay_cluster_redis_up",
                "1 while this instance's cluster bus is connected to Redis, else 0.",
                1 if c.redis_up else 0,
            )
            counter(
                "pyrycode_relay_cluster_lease_renew_failures",
                "Lease renewals (every --cluster-lease/3) that failed or could not be tried.",
                [],
                {(): c.lease_renew_failures},
            )
        if x.tasks is not None:
            gauge(
                "pyrycode_relay_asyncio_tasks",
                "asyncio tasks alive in the relay's event loop (none per connection: a leak "
                "detector for soak tests).",
                x.tasks(),
            )
        # client_golang sorts families by name; keep scrapes byte-comparable with the reference.
        families.sort(key=lambda m: m.name + ("_total" if m.type == "counter" else ""))
        yield from families


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """What `pyrycode_relay_build_info` says about the running process."""

    version: str
    python: str  # e.g. 3.12.7
    implementation: str  # sys.implementation.name: cpython, pypy
    loop: str  # uvloop or asyncio
    revision: str = ""  # the source revision of the build; "" when unknown

    @classmethod
    def current(cls, version: str, loop: asyncio.AbstractEventLoop) -> BuildInfo:
        """This process's, serving on `loop`."""
        loop_module = type(loop).__module__.partition(".")[0]
        return cls(
            version=version,
            python=platform.python_version(),
            implementation=sys.implementation.name,
            loop="uvloop" if loop_module == "uvloop" else "asyncio",
            revision=source_revision() or "",
        )


@dataclass(frozen=True, slots=True)
class ClusterFigures:
    published: int
    received: int
    remote_phones: int
    redis_up: bool
    lease_renew_failures: int


class MetricsExporter:
    """Renders `/metrics` from a `RelayStats`, a live-count source, an outbox-size source,
    when push is on the push waker's outcome counts, and optionally a task-count source, the
    cluster's figures and (a TLS mode) the served certificate's expiry in Unix seconds."""

    def __init__(
        self,
        stats: RelayStats,
        counts: Callable[[], tuple[int, int]],
        outbox_bytes: Callable[[], int],
        push_outcomes: dict[str, int] | None = None,
        *,
        build: BuildInfo,
        tasks: Callable[[], int] | None = None,
        cluster: Callable[[], ClusterFigures] | None = None,
        cert_not_after: Callable[[], float | None] | None = None,
    ) -> None:
        self.build = build
        self.stats = stats
        self.counts = counts
        self.outbox_bytes = outbox_bytes
        self.push_outcomes = push_outcomes  # None: push is off, the series does not exist
        self.tasks = tasks
        self.cluster = cluster  # None: single instance, the cluster series do not exist
        self.cert_not_after = cert_not_after  # None: insecure mode, no certificate series
        self.in_flight = 0
        self.handler_requests: dict[str, int] = dict.fromkeys(_HANDLER_CODES, 0)
        # A private registry: the global one would add process_/python_/gc series.
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_RelayCollector(self))

    def render(self) -> tuple[bytes, str]:
        """One scrape: (body, content type). Like promhttp, a scrape counts itself once done."""
        self.in_flight += 1
        try:
            body = generate_latest(self._registry)
        except Exception:
            self.handler_requests["500"] += 1
            raise
        finally:
            self.in_flight -= 1
        self.handler_requests["200"] += 1
        return body, CONTENT_TYPE
