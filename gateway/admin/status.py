"""The status document (`/_gateway/status.json`) the status page polls: per route the cache
outcomes and hit ratio, bytes served and fetched, upstream health; the cache against its
cap; blob transfers in flight; the most pulled repositories; readiness.

Counters come from the text /metrics renders (samples.py), never from a second count;
transfers and pulls are read from the objects the composition root hands in. Read-only.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..cache import BlobFlight
from ..config import Config, Route
from ..metrics import Metrics
from .pulls import Pulls
from .ready import Readiness
from .samples import Samples, quantile_bound

Transfers = Callable[[], Iterable[tuple[tuple[str, str], BlobFlight]]]
RESULTS = ("hit", "miss", "stale", "coalesced")
BREAKER = {0: "closed", 1: "open", 2: "half_open"}
RECENT = 300.0  # an upstream failure this many seconds old still marks the route degraded
# Answers about the client's request (missing image, no access), not upstream trouble.
_NOT_HEALTH = frozenset({"http_404", "http_401", "http_403", "http_416"})
TOP_REPOSITORIES = 20


@dataclass(frozen=True)
class Sources:
    """What the status page reads, built by the composition root."""

    metrics: Metrics
    current: Callable[[], Config]
    transfers: Transfers  # the blob flights of this process: ((namespace, digest), flight)
    pulls: Pulls
    readiness: Readiness


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _int(value: float) -> int:
    return round(value)


def _ratelimit(samples: Samples, route: str) -> list[dict[str, Any]]:
    accounts: dict[str, dict[str, Any]] = {}
    for key, metric in (("limit", "gateway_upstream_ratelimit_limit"),
                        ("remaining", "gateway_upstream_ratelimit_remaining"),
                        ("window_seconds", "gateway_upstream_ratelimit_window_seconds"),
                        ("out_until", "gateway_upstream_account_out_until_seconds")):
        for account, value in samples.by("account", metric, route=route).items():
            accounts.setdefault(account, {"account": account})[key] = _int(value)
    return [accounts[name] for name in sorted(accounts)]


def _upstream(samples: Samples, route: str, now: float) -> dict[str, Any]:
    count, total, buckets = samples.histogram("gateway_upstream_request_duration_seconds",
                                              route=route)
    stamps = samples.by("reason", "gateway_upstream_last_error_timestamp_seconds", route=route)
    last = max(stamps.items(), key=lambda item: item[1], default=None)
    health_stamps = [at for reason, at in stamps.items() if reason not in _NOT_HEALTH]
    endpoints = [{"url": s.labels.get("upstream", ""), "breaker": BREAKER.get(int(s.value), "?")}
                 for s in samples.matching("gateway_upstream_breaker_state", route=route)]
    backoff = samples.total("gateway_upstream_backoff_until_seconds", route=route)
    states = {e["breaker"] for e in endpoints}
    if (endpoints and states == {"open"}) or backoff > now:
        health = "down"
    elif states - {"closed"} or any(now - at < RECENT for at in health_stamps):
        health = "degraded"
    else:
        health = "ok"
    return {
        "health": health,
        "requests": _int(samples.total("gateway_upstream_requests_total", route=route)),
        "errors": {k: _int(v) for k, v in
                   samples.by("reason", "gateway_upstream_errors_total", route=route).items()},
        "last_error": {"reason": last[0], "at": last[1]} if last else None,
        "latency": {"count": _int(count), "mean_seconds": total / count if count else None,
                    "p95_seconds": _finite(quantile_bound(buckets, count, 0.95))},
        "endpoints": endpoints,
        "ratelimit": _ratelimit(samples, route),
        "rate_limited": _int(samples.total("gateway_upstream_rate_limited_total", route=route)),
        "backoff_until": backoff or None,
    }


def route_status(samples: Samples, route: Route, now: float) -> dict[str, Any]:
    name = route.name
    outcomes = samples.by("result", "gateway_cache_requests_total", route=name)
    lookups = {result: _int(outcomes.get(result, 0.0)) for result in RESULTS}
    looked = sum(lookups.values())
    served = _int(samples.total("gateway_served_bytes_total", route=name))
    fetched = _int(samples.total("gateway_upstream_bytes_total", route=name))
    return {
        "name": name,
        "label": route.label,
        "requests": _int(samples.total("gateway_requests_total", route=name)),
        "lookups": lookups,
        "hit_ratio": lookups["hit"] / looked if looked else None,
        "served_bytes": served,
        "upstream_bytes": fetched,
        "saved_bytes": max(served - fetched, 0),
        "cache_bytes": _int(samples.total("gateway_cache_bytes", route=name)),
        "cache_quota_bytes": route.cache.max_size,
        "pinned_bytes": _int(samples.total("gateway_pinned_bytes", route=name)),
        "inflight_fetches": _int(samples.total("gateway_inflight_fetches", route=name)),
        "upstream": _upstream(samples, name, now),
    }


def transfers(found: Iterable[tuple[tuple[str, str], BlobFlight]],
              config: Config) -> list[dict[str, Any]]:
    names = {route.namespace: route.name for route in config.routes}
    listed = [{"route": names.get(namespace, namespace), "digest": digest,
               "bytes": flight.written, "size": flight.size,
               # A client reading it (its holds are internal: one client may hold twice).
               "followed": flight.readers > 0,
               "resumes": flight.resumes, "verified": flight.done}
              for (namespace, digest), flight in found]
    return sorted(listed, key=lambda t: (t["route"], t["digest"]))


async def document(sources: Sources) -> dict[str, Any]:
    """The whole status document; the /metrics text is rendered and parsed in a thread."""
    config = sources.current()
    flying = transfers(sources.transfers(), config)
    outcomes = await sources.readiness.outcomes()
    samples = await asyncio.to_thread(lambda: Samples(sources.metrics.render().decode()))
    now = time.time()
    return {
        "version": __version__,
        "pid": os.getpid(),
        "generated": now,
        "ready": {"ready": all(o.ok for o in outcomes),
                  "checks": [{"name": o.name, "ok": o.ok, "reason": o.reason}
                             for o in outcomes]},
        "cache": {"used_bytes": _int(samples.total("gateway_cache_bytes")),
                  "limit_bytes": _int(samples.total("gateway_cache_limit_bytes")) or None,
                  "max_size": config.cache.max_size,
                  "pinned_bytes": _int(samples.total("gateway_pinned_bytes"))},
        "routes": [route_status(samples, route, now) for route in config.routes],
        "transfers": flying,
        "top_repositories": sources.pulls.top(TOP_REPOSITORIES),
    }
