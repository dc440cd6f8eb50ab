"""The bench's JSON summary: medians over repetitions and the ratios between relays.

Owns: grouping runs by relay (and rate), the median of each figure a scenario reports, the
ratios self ÷ go and self ÷ echo, the cluster's cross-instance figures next to the single
instance's (and cross ÷ single), the figures behind a balancer hashing next to round-robin
(and hash ÷ round-robin), and the human line per comparison.
Must never: measure anything or drop a run: a failed run counts in its group's `ok`.
"""

from __future__ import annotations

import statistics
from typing import Any


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(nums), 3) if nums else None


SUMMARY_KEYS = {
    "closed": (
        "rps",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "relay_cpu_pct",
        "relay_cpu_us_per_rt",
        "client_cpu_pct",
        "other_cpu_pct",
        "bus_fraction",
    ),
    "open": (
        "rps",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "service_p50_ms",
        "service_p99_ms",
        "send_lag_p99_ms",
        "relay_cpu_pct",
        "relay_cpu_us_per_rt",
        "client_cpu_pct",
        "bus_fraction",
    ),
    "idle": (
        "kib_per_conn",
        "rss_before_kib",
        "rss_loaded_kib",
        "handshakes_per_s",
        "relay_idle_cpu_pct",
        "client_cpu_pct",
        "pings_answered",
    ),
}
PER_PROCESS = ("relay_cpu_pct_", "relay_rss_kib_")  # cluster runs: each process apart


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for tag in dict.fromkeys((r["relay"], r.get("rate")) for r in runs):
        rs = [r["result"] for r in runs if (r["relay"], r.get("rate")) == tag]
        key = tag[0] if tag[1] is None else f"{tag[0]}@{tag[1]:g}"
        keys = list(SUMMARY_KEYS[scenario])
        keys += [k for k in dict.fromkeys(k for r in rs for k in r) if k.startswith(PER_PROCESS)]
        g: dict[str, Any] = {k: _median([r.get(k) for r in rs]) for k in keys}
        g["runs"] = len(rs)
        g["ok"] = all(r.get("ok") for r in rs)
        g["client_bound_runs"] = sum(bool(r.get("client_bound")) for r in rs)
        if scenario != "idle":
            g["rps_min_max"] = [min(r["rps"] for r in rs), max(r["rps"] for r in rs)]
        groups[key] = g
    ratios: dict[str, float | None] = {}
    for key, g in groups.items():
        relay, _, rate = key.partition("@")
        suffix = f"@{rate}" if rate else ""
        if relay == "cluster":
            single = groups.get("self" + suffix)
            if single is not None:
                for k in ("rps", "p50_ms", "p99_ms", "relay_cpu_us_per_rt"):
                    ratios[f"{k}_cluster_over_self{suffix}"] = _ratio(g[k], single[k])
            continue
        if relay != "self":
            continue
        go = groups.get("go" + suffix)
        echo = groups.get("echo" + suffix)
        if go is not None:
            for k in ("rps", "p99_ms", "kib_per_conn"):
                if k in g:
                    ratios[f"{k}_self_over_go{suffix}"] = _ratio(g[k], go[k])
        if echo is not None and "rps" in g:
            ratios[f"rps_self_over_echo{suffix}"] = _ratio(g["rps"], echo["rps"])
    out: dict[str, Any] = {"relays": groups, "ratios": ratios}
    if any(key.partition("@")[0] == "cluster" for key in groups):
        out["cluster"] = cluster_comparison(groups)
    if any(key.partition("@")[0].endswith("-hash") for key in groups):
        out["balancer"] = balancer_comparison(groups)
    return out


def _figures(g: dict[str, Any]) -> dict[str, Any]:
    rps = g["rps"]
    return {
        "round_trips_per_s": rps,
        "frames_per_s": round(2 * rps, 1) if rps is not None else None,
        "p50_ms": g["p50_ms"],
        "p99_ms": g["p99_ms"],
        "relay_cpu_pct": g["relay_cpu_pct"],
        "relay_cpu_us_per_rt": g["relay_cpu_us_per_rt"],
        "ok": g["ok"],
    }


def cluster_comparison(groups: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Cross-instance figures next to the single instance's of the same run, and the
    ratios cross ÷ single (medians over repetitions). A round trip is one phone frame
    and its echo: both cross from one instance to the other, so frames/s = 2 * rps."""
    rows: list[dict[str, Any]] = []
    for key, g in groups.items():
        relay, _, rate = key.partition("@")
        if relay != "cluster":
            continue
        single = groups.get("self" + (f"@{rate}" if rate else ""))
        row: dict[str, Any] = {"rate_per_phone": float(rate)} if rate else {}
        row["cross_instance"] = _figures(g)
        row["single_instance"] = _figures(single) if single is not None else None
        if single is not None:
            cross, one = row["cross_instance"], row["single_instance"]
            row["ratio_cross_over_single"] = {
                k: _ratio(cross[k], one[k])
                for k in ("frames_per_s", "p50_ms", "p99_ms", "relay_cpu_us_per_rt")
            }
        rows.append(row)
    return rows


def cluster_line(row: dict[str, Any]) -> str:
    """One human line per comparison row (stderr)."""
    cross, one = row["cross_instance"], row["single_instance"]
    rate = f" @{row['rate_per_phone']:g}/s per phone" if "rate_per_phone" in row else ""
    text = (
        f"cluster{rate}: cross-instance {cross['frames_per_s']} frames/s "
        f"p50 {cross['p50_ms']} ms p99 {cross['p99_ms']} ms"
    )
    if one is not None:
        r = row["ratio_cross_over_single"]
        text += (
            f"; single instance {one['frames_per_s']} frames/s p50 {one['p50_ms']} ms "
            f"p99 {one['p99_ms']} ms; ratio cross/single frames/s {r['frames_per_s']} "
            f"p50 {r['p50_ms']} p99 {r['p99_ms']}"
        )
    return text


def balancer_comparison(groups: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Behind one balancer: hashing X-Pyrycode-Server next to round-robin in the same run,
    with the share of frames that crossed the bus, the balancer's own CPU, and the ratios
    hash ÷ round-robin (medians over repetitions)."""
    rows: list[dict[str, Any]] = []
    for key, g in groups.items():
        relay, _, rate = key.partition("@")
        if not relay.endswith("-hash"):
            continue
        name = relay.removesuffix("-hash")
        base = groups.get(f"{name}-roundrobin" + (f"@{rate}" if rate else ""))
        row: dict[str, Any] = {"balancer": name}
        if rate:
            row["rate_per_phone"] = float(rate)
        for label, group in (("hash", g), ("roundrobin", base)):
            if group is None:
                row[label] = None
                continue
            row[label] = {
                **_figures(group),
                "bus_fraction": group["bus_fraction"],
                "balancer_cpu_pct": group.get("relay_cpu_pct_balancer"),
            }
        if base is not None:
            hashed, rr = row["hash"], row["roundrobin"]
            row["ratio_hash_over_roundrobin"] = {
                k: _ratio(hashed[k], rr[k])
                for k in ("frames_per_s", "p50_ms", "p99_ms", "relay_cpu_us_per_rt")
            }
        rows.append(row)
    return rows


def balancer_line(row: dict[str, Any]) -> str:
    """One human line per balancer comparison (stderr)."""
    rate = f" @{row['rate_per_phone']:g}/s per phone" if "rate_per_phone" in row else ""
    parts = []
    for label in ("hash", "roundrobin"):
        f = row[label]
        if f is not None:
            parts.append(
                f"{label} {f['frames_per_s']} frames/s p99 {f['p99_ms']} ms "
                f"bus {f['bus_fraction']} {row['balancer']} cpu {f['balancer_cpu_pct']} %"
            )
    text = f"{row['balancer']}{rate}: " + "; ".join(parts)
    if "ratio_hash_over_roundrobin" in row:
        r = row["ratio_hash_over_roundrobin"]
        text += f"; hash/roundrobin frames/s {r['frames_per_s']} p99 {r['p99_ms']}"
    return text
