"""Plot RTT percentiles against offered load from one `pyrycode-relay bench open` sweep.

Owns: turning a bench JSON (open loop, several --rate values, relays self and go) into
docs/performance-latency.png. Must never: measure anything itself; it only reads JSON.

    python bench/plot_latency.py bench/results/open-sweep.json docs/performance-latency.png
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on CI or servers
import matplotlib.pyplot as plt

LABELS = {"self": "pyrycode-relay (Python)", "go": "Go stand-in relay"}
STYLES = {"self": "tab:blue", "go": "tab:orange"}


def series(doc: dict[str, Any], relay: str, key: str) -> tuple[list[float], list[float]]:
    points = []
    for name, g in doc["relays"].items():
        who, _, rate = name.partition("@")
        if who == relay and g.get(key) is not None:
            points.append((float(rate) * doc["phones"], g[key]))
    points.sort()
    return [x for x, _ in points], [y for _, y in points]


def main(argv: list[str]) -> int:
    src, dst = argv
    with open(src, encoding="utf-8") as f:
        doc = json.load(f)
    doc["phones"] = doc["runs"][0]["result"]["phones"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for relay in ("self", "go"):
        for key, dash in (("p50_ms", "-"), ("p99_ms", "--")):
            xs, ys = series(doc, relay, key)
            if xs:
                ax.plot(xs, ys, dash, marker="o", color=STYLES[relay],
                        label=f"{LABELS[relay]} {key.split('_')[0]}")  # fmt: skip
    ax.set_xlabel(f"offered load, round trips/s ({doc['phones']} phones, open loop)")
    ax.set_ylabel("round-trip time from scheduled send, ms")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    m = doc["machine"]
    title = f"RTT vs offered load, relay pinned to 1 core ({m['cpu_model']}, {m['cpus']} vCPU)"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
