"""Token buckets by key (a client address, a route): the arithmetic of every limit, on an
injected clock, bounded in memory.

Pure logic: no I/O, no config, no sleeping (callers wait the seconds it returns), no locks
(one event loop owns an instance).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class _Bucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float, rate: float, burst: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.rate = rate  # as of the last use: what the sweep judges "refilled" by
        self.burst = burst

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class Buckets(Generic[K]):
    """One token bucket per key. Rates are given on each call (so a reloaded config takes
    effect at once); a bucket refills `rate` tokens a second up to `burst`.

    Memory stays bounded: a bucket that has refilled to `burst` is the same as no bucket,
    so those are dropped when the table grows past `max_entries`; if it is still full
    (a flood of addresses, all in debt), the oldest half goes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 max_entries: int = 65536) -> None:
        self._clock = clock
        self._max = max_entries
        self._buckets: dict[K, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: K, rate: float, burst: float, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._sweep(now)
            bucket = self._buckets[key] = _Bucket(burst, now, rate, burst)
            return bucket
        if now > bucket.stamp:
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
        bucket.rate, bucket.burst = rate, burst
        return bucket

    def take(self, key: K, rate: float, burst: float, cost: float = 1.0) -> float:
        """Take `cost` tokens if there are that many: 0.0. Otherwise take nothing and
        return the seconds until there will be (a Retry-After)."""
        now = self._clock()
        bucket = self._bucket(key, rate, burst, now)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (min(cost, burst) - bucket.tokens) / rate if rate > 0 else math.inf

    def borrow(self, key: K, rate: float, burst: float, cost: float) -> float:
        """Take `cost` tokens, into debt if need be; return the seconds to wait before
        using them (0.0 when there were enough). For pacing: each chunk of a transfer is
        paid for, and concurrent transfers under one key share the rate."""
        now = self._clock()
        bucket = self._bucket(key, rate, burst, now)
        bucket.tokens -= cost
        if bucket.tokens >= 0:
            return 0.0
        return -bucket.tokens / rate if rate > 0 else math.inf

    def _sweep(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]
        if len(self._buckets) >= self._max * 3 // 4:  # keep the sweeps rare
            for key in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[key]


def retry_after(seconds: float) -> str:
    """`Retry-After` in whole seconds (RFC 9110 10.2.3), at least 1."""
    return str(max(1, math.ceil(seconds))) if math.isfinite(seconds) else "3600"
