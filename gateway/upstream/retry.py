"""Which upstream failures are worth another try, and how long to wait before it:
exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
Jitter": sleep = random(0, min(cap, base * 2**n))).

Pure decisions: no I/O, no sleeping here; randomness is injected so tests can fix it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import UpstreamError

# Docker Hub's pull-limit answer names these; an abuse limit (or another registry's
# 429) answers without them, and is worth one more careful try.
RATE_LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "docker-ratelimit-source")
IDEMPOTENT = frozenset({"GET", "HEAD"})


class Verdict(enum.Enum):
    """What one failed attempt means."""

    DOWN = "down"  # connect error, timeout, 5xx: the upstream is failing (breaker, fallback)
    BUSY = "busy"  # 429 without rate-limit headers: alive but pushing back (retry, no fallback)
    FINAL = "final"  # any other answer: the upstream spoke; hand it on


def status_verdict(status: int, headers: Mapping[str, str]) -> Verdict:
    if status >= 500:
        return Verdict.DOWN
    if status == 429 and not any(name in headers for name in RATE_LIMIT_HEADERS):
        return Verdict.BUSY
    return Verdict.FINAL


def error_verdict(exc: UpstreamError) -> Verdict:
    """An error raised before an answer we could judge by status (connect, timeout, a
    broken token endpoint, a redirect loop): retryable ones mean the upstream is down."""
    if exc.upstream_status is not None:
        return status_verdict(exc.upstream_status, {}) if exc.upstream_status >= 500 \
            else Verdict.FINAL
    return Verdict.DOWN if exc.retryable else Verdict.FINAL


def retry_after(headers: Mapping[str, str]) -> float:
    """Retry-After in seconds (0 if absent or a date: the backoff decides then)."""
    value = headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else 0.0


@dataclass(frozen=True)
class Backoff:
    base: float
    cap: float
    random: Callable[[], float] = random.random  # in [0, 1)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        return float(self.random() * min(self.cap, self.base * (2 ** attempt)))
