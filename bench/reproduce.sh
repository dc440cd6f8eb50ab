#!/usr/bin/env bash
# Re-runs every measurement cited in docs/performance.md and writes the JSON results into
# bench/results/. Needs the Go stand-in and loadgen built (/work/shared/anchors/build.sh,
# or ANCHORS=<dir with bin/ and compare.sh>) and a 2-core machine with nothing else
# running. Loopback only; every run is bounded by its own duration. Takes ~30 minutes;
# step 6 needs redis-server on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ANCHORS=${ANCHORS:-/tmp/anchors}
GO="$ANCHORS/bin/go-relay"
R=bench/results
B=(.venv/bin/pyrycode-relay bench --go-relay "$GO")
ulimit -n "$(ulimit -Hn)"
mkdir -p "$R"

# 1. Headline throughput and idle memory with the anchors' own tool (Go loadgen).
RELAY="$PWD/.venv/bin/python -m pyrycode_relay --insecure-listen 127.0.0.1:{PORT}"
RELAY+=" --max-connections 20000 --rate-limit-burst 0 --metrics-listen ''"
OUT=/tmp/compare-after RELAY_CMD="$RELAY" NAME=python REPS=5 DUR=10 "$ANCHORS/compare.sh" >/dev/null
mkdir -p "$R/compare-after" && cp /tmp/compare-after/{summary.json,runs.jsonl} "$R/compare-after/"

# 2. Closed loop with the echo ceiling, our client (3 interleaved repetitions).
for d in 1 8; do
  "${B[@]}" closed --relay self,go,echo -b 10 -p 10 -d "$d" --reps 3 --dur 5 \
    --out "$R/closed-10x10x$d.json" >/dev/null
done


# 3. Open loop: 5,000 phones at 1 frame/s (5 repetitions), then a sweep for the plot.
"${B[@]}" open --relay self,go --phones 5000 --rate 1 --reps 5 --dur 10 \
  --out "$R/open-5000x1.json" >/dev/null
"${B[@]}" open --relay self,go --phones 5000 --rate 0.5,1,2,4,6 --dur 5 \
  --out "$R/open-sweep.json" >/dev/null
.venv/bin/python bench/plot_latency.py "$R/open-sweep.json" docs/performance-latency.png

# 4. Idle: 10,000 connections held 65 s (two 30 s heartbeats), ours and the Go relay.
"${B[@]}" idle --relay self,go --connections 10000 --hold 65 --out "$R/idle-10000.json" >/dev/null

# 5. Memory growth with connections and with queued bytes.
.venv/bin/pyrycode-relay bench memory --connections 10000 >"$R/memory-growth.txt"

# 6. Cluster: a fresh redis-server and two instances (every binary on bench-a, every phone
#    on bench-b, so every frame crosses instances through Redis) next to a single relay in
#    the same run. Pinned: all server processes share one CPU, as the single relay has it;
#    --no-pin: nothing pinned (the instances may use both cores, with the load generator).
for d in 1 8; do
  .venv/bin/pyrycode-relay bench closed --cluster -b 10 -p 10 -d "$d" --dur 10 --reps 3 \
    --out "$R/cluster-closed-10x10x$d.json" >/dev/null
  .venv/bin/pyrycode-relay bench closed --cluster --no-pin -b 10 -p 10 -d "$d" --dur 10 \
    --reps 3 --out "$R/cluster-closed-10x10x$d-nopin.json" >/dev/null
done
.venv/bin/pyrycode-relay bench open --cluster --phones 5000 -p 10 --rate 1 --dur 10 --reps 3 \
  --out "$R/cluster-open-5000x1.json" >/dev/null
# Three instances behind HAProxy (deploy/haproxy.cfg): hash vs round-robin (needs haproxy).
.venv/bin/pyrycode-relay bench closed --balancer haproxy -b 10 -p 10 -d 8 --reps 3 --warmup 1 \
  --dur 5 --out "$R/balancer-haproxy-closed-10x10x8.json" >/dev/null
.venv/bin/pyrycode-relay bench open --cluster --phones 5000 -p 10 --rate 0.25,0.5 --dur 10 \
  --reps 3 --out "$R/cluster-open-5000-low.json" >/dev/null
