"""Per-key token-bucket rate limiter (reference §8.3).

Owns: the bucket arithmetic and eviction of idle buckets. Must never: read the wall clock
(time comes from the injected `Clock`), schedule its own sweeps, or decide what a key is;
the caller denies an empty IP before asking.
"""

from __future__ import annotations

from pyrycode_relay.core.clock import Clock


class _Bucket:
    __slots__ = ("last_seen", "refill_at", "tokens")

    def __init__(self, tokens: int, now: float) -> None:
        self.tokens = tokens
        # Two anchors: `refill_at` moves in whole intervals so fractions of time carry over;
        # `last_seen` moves on every request (denied ones too) and drives eviction.
        self.refill_at = now
        self.last_seen = now


class TokenBucketLimiter:
    """`burst` tokens per key, one more every `interval` seconds. `burst == 0` disables it."""

    __slots__ = ("_buckets", "_burst", "_clock", "_interval")

    def __init__(self, burst: int, interval: float, clock: Clock) -> None:
        if burst < 0:
            raise ValueError("rate-limit burst must not be negative")
        if burst > 0 and interval <= 0:
            raise ValueError("rate-limit interval must be positive")
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str) -> bool:
        """Take one token for `key`; False when none is left."""
        if self._burst == 0:
            return True
        now = self._clock()
        b = self._buckets.get(key)
        if b is None:
            # A new key starts full and this request spends one token.
            self._buckets[key] = _Bucket(self._burst - 1, now)
            return True
        elapsed = now - b.refill_at
        if elapsed > 0:
            add = int(elapsed // self._interval)
            if add > 0:
                b.tokens = min(self._burst, b.tokens + add)
                b.refill_at += add * self._interval
        b.last_seen = now
        if b.tokens > 0:
            b.tokens -= 1
            return True
        return False

    def sweep(self) -> int:
        """Drop buckets idle for at least burst*interval (they would be full); return how many."""
        if not self._buckets:
            return 0
        now = self._clock()
        idle = self._burst * self._interval
        stale = [k for k, b in self._buckets.items() if now - b.last_seen >= idle]
        for k in stale:
            del self._buckets[k]
        return len(stale)

    def export(self) -> list[tuple[str, int, float, float]]:
        """Every bucket as (key, tokens, seconds since its refill anchor, seconds since it
        was last seen), for a successor process (live handover)."""
        now = self._clock()
        return [
            (k, b.tokens, now - b.refill_at, now - b.last_seen) for k, b in self._buckets.items()
        ]

    def restore(self, key: str, tokens: int, refill_ago: float, seen_ago: float) -> None:
        """One bucket as `export` gave it."""
        now = self._clock()
        bucket = _Bucket(tokens, now - refill_ago)
        bucket.last_seen = now - seen_ago
        self._buckets[key] = bucket

    def __len__(self) -> int:
        return len(self._buckets)
