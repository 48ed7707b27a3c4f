"""Reading an upstream's rate-limit answers: Docker Hub's `ratelimit-limit`,
`ratelimit-remaining` (`100;w=21600`: pulls per window of seconds) and
`docker-ratelimit-source`, `Retry-After`, and which kind a 429 is.

Pure functions of headers and a clock reading: no state, no I/O, no metrics.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# `100;w=21600` (RFC draft "RateLimit header fields", as Docker Hub sends it). Anything
# after the window is ignored; a malformed value reads as absent, never as zero.
_QUOTA = re.compile(r"\s*(\d{1,12})\s*(?:;\s*w\s*=\s*(\d{1,12}))?\s*(?:;.*)?", re.ASCII)
# What an upstream may ask at most: a broken header must not shut a route for a week.
MAX_WAIT = 24 * 3600.0
# A 429 that says nothing about when: back off this long (today's message said 60 s too).
DEFAULT_WAIT = 60.0

Kind = Literal["pull_limit", "abuse"]


@dataclass(frozen=True, slots=True)
class Quota:
    """What one answer said about the account's pulls; each part None if not said."""

    limit: int | None
    remaining: int | None
    window: float | None  # seconds
    source: str | None  # the IP address or account id Docker Hub counts against


def _number(value: str | None) -> tuple[int, float | None] | None:
    if value is None:
        return None
    match = _QUOTA.fullmatch(value)
    if match is None:
        return None
    window = float(match.group(2)) if match.group(2) else None
    return int(match.group(1)), window


def parse_quota(headers: Mapping[str, str]) -> Quota | None:
    """The rate-limit headers of one answer, or None when it has none usable."""
    limit = _number(headers.get("RateLimit-Limit"))
    remaining = _number(headers.get("RateLimit-Remaining"))
    source = (headers.get("Docker-RateLimit-Source") or "").strip()[:64] or None
    if limit is None and remaining is None:
        return None
    window = next((part[1] for part in (remaining, limit) if part and part[1]), None)
    return Quota(limit[0] if limit else None, remaining[0] if remaining else None, window,
                 source)


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """`Retry-After` in seconds from `now` (delta-seconds or an HTTP date), capped at
    MAX_WAIT; None when absent or unreadable (RFC 9110 §10.2.3)."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return min(float(value), MAX_WAIT)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(when.timestamp() - now, 0.0), MAX_WAIT)


def kind_of_429(quota: Quota | None) -> Kind:
    """A pull-limit 429 names the account's quota as spent (remaining 0); an abuse limit
    answers a plain 429 without rate-limit headers. Anything in between is treated as the
    abuse kind: backing off the whole upstream is the safe guess."""
    return "pull_limit" if quota is not None and quota.remaining == 0 else "abuse"


def seconds_header(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
