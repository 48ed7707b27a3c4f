"""Prometheus collectors, labelled by route, in a registry owned by one app.

No module-level collectors: `Metrics()` is built by `create_app`, so two apps in one
process (tests) never share counters. Labels never carry secrets or repository names
(unbounded cardinality); repositories go to the access log instead.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client import Gauge as _LibraryGauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Fine around the 5 ms a stalled loop may cost a request; an idle loop stays below 1 ms.
_LAG_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                2.5, 5)


# ------------------------------------------------------------ workers (multiprocess mode)
# `serve --workers N`: each worker writes its values to files in one directory
# (prometheus-client's multiprocess mode) and /metrics, whichever worker answers it, adds
# them up. Counters and histograms are summed; each gauge says how it adds up. Ignored
# in one process. The library writes the file at every change (a lock, a struct, an mmap
# write: five of them per request); here a change is kept in memory, the changed values
# are written at each tick of the loop-lag task (looplag.py, every 50 ms) and at exit,
# and a scrape waits a little over two ticks, so every worker's values up to it are in
# the files (a worker killed outright loses its last tick's changes, at most).
SCRAPE_WAIT = 0.12
GaugeMode = Literal["all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
                    "mostrecent", "livemostrecent"]
_GAUGE_MODES: MappingProxyType[str, GaugeMode] = MappingProxyType({
    # Facts about the shared data directory, written by whichever worker looked last.
    "gateway_cache_bytes": "mostrecent",
    "gateway_cache_limit_bytes": "mostrecent",
    "gateway_pinned_bytes": "mostrecent",
    # Work in progress: the sum over the live workers.
    "gateway_inflight_fetches": "livesum",
    # The running config: the oldest a live worker runs, and 0 if any refused a reload.
    "gateway_config_last_reload_success_timestamp_seconds": "livemin",
    "gateway_config_last_reload_successful": "livemin",
    # Upstream quotas: what the upstream said last, to whichever worker.
    "gateway_upstream_ratelimit_limit": "livemostrecent",
    "gateway_upstream_ratelimit_remaining": "livemostrecent",
    "gateway_upstream_ratelimit_window_seconds": "livemostrecent",
})  # everything else (breaker states, back-off times, info): the highest of the live ones


class Gauge(_LibraryGauge):
    """prometheus-client's Gauge with the multiprocess mode its name calls for."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 **kwargs: Any) -> None:
        # (labels() builds each child with the parent's keywords, the mode among them.)
        kwargs.setdefault("multiprocess_mode", _GAUGE_MODES.get(name, "livemax"))
        super().__init__(name, documentation, labelnames, **kwargs)


def use_multiprocess(directory: Path) -> None:
    """Make this (forked, not yet measuring) worker write its metrics to `directory`:
    called before the worker's `Metrics()` is built. The library picks its value class
    from the environment at import, which in a forked worker was long ago."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = deferred_value_class()


def deferred_value_class(process_identifier: Callable[[], Any] = os.getpid) -> Any:
    """prometheus-client's multiprocess value (its file, its key, its start from what the
    file holds), but a change stays in memory until `flush()` writes every changed value
    (one lock per change, as in one process). `process_identifier` names the file."""
    base: Any = values.MultiProcessValue(process_identifier)  # type: ignore[no-untyped-call]
    lock = threading.Lock()  # changes come from threads too (to_thread work)
    changed: set[Any] = set()

    class DeferredValue(base):  # type: ignore[misc]
        def inc(self, amount: float) -> None:
            with lock:
                self._value += amount
                self._timestamp = 0.0
                changed.add(self)

        def set(self, value: float, timestamp: float | None = None) -> None:
            with lock:
                self._value = value
                self._timestamp = timestamp or 0.0
                changed.add(self)

        def get(self) -> float:
            with lock:
                return float(self._value)

        @staticmethod
        def flush() -> None:
            with lock:
                for value in changed:
                    value._file.write_value(value._key, value._value, value._timestamp)
                changed.clear()

    return DeferredValue


def forget_process(directory: Path, pid: int) -> None:
    """A worker ended: its live gauges no longer count (its counters still do)."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def _multiprocess_directory() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") \
        if getattr(values.ValueClass, "_multiprocess", False) else None


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests", "Client requests by route, kind, method and status",
            ["route", "kind", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds", "Time to answer a client request (whole body)",
            ["route", "kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.cache = Counter(
            "gateway_cache_requests", "Cache outcomes by route, kind and result "
            "(hit, miss, stale, coalesced)", ["route", "kind", "result"], registry=r)
        self.bytes_served = Counter(
            "gateway_served_bytes", "Body bytes sent to clients", ["route"], registry=r)
        self.upstream_bytes = Counter(
            "gateway_upstream_bytes", "Body bytes received from upstreams", ["route"], registry=r)
        self.upstream_seconds = Histogram(
            "gateway_upstream_request_duration_seconds",
            "Upstream time to response headers", ["route", "kind"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_requests = Counter(
            "gateway_upstream_requests", "Requests sent upstream by route, kind and status",
            ["route", "kind", "status"], registry=r)
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by route and reason",
            ["route", "reason"], registry=r)
        self.resumed = Counter(
            "gateway_upstream_resumed_transfers", "Blob transfers resumed with Range",
            ["route"], registry=r)
        self.integrity_failures = Counter(
            "gateway_integrity_failures", "Fetched content whose digest or size did not match",
            ["route", "kind"], registry=r)
        self.stale_served = Counter(
            "gateway_stale_served", "Tags answered from cache because the upstream failed",
            ["route"], registry=r)
        self.disk_full = Counter(
            "gateway_disk_full", "Writes that failed because the disk or quota was full "
            "(ENOSPC, EDQUOT), by route and what was being written (blob, manifest, tag)",
            ["route", "what"], registry=r)
        self.disk_full_relays = Counter(
            "gateway_disk_full_relays", "Blob GETs answered straight from the upstream, "
            "verified and not kept, because the disk was full", ["route"], registry=r)
        self.inflight = Gauge(
            "gateway_inflight_fetches", "Upstream blob fetches in progress", ["route"], registry=r)
        self.event_loop_lag = Histogram(
            "gateway_event_loop_lag_seconds", "How late the event loop woke a timer "
            "(sampled every 50 ms): time it spent on work that did not yield",
            buckets=_LAG_BUCKETS, registry=r)
        self.refusals = Counter(
            "gateway_refusals", "Requests refused by access rules or limits, by route and "
            "reason (e.g. denied_address, login_required, bad_login, denied_repository, "
            "rate, bandwidth, misses, connections, admin_only)", ["route", "reason"],
            registry=r)
        self._add_part_collectors(r)

        # Children looked up once: labels() locks per call (a share of a warm manifest GET).
        self._cache_children: dict[tuple[str, str, str], Counter] = {}
        self._request_children: dict[tuple[str, str, str, int],
                                     tuple[Counter, Histogram, Counter]] = {}
        # Workers: writes this process's changed values to its file (None: one process).
        self._flush: Callable[[], None] | None = getattr(values.ValueClass, "flush", None)

    def _add_part_collectors(self, r: CollectorRegistry) -> None:
        self._add_disk_collectors(r)
        self._add_reload_collectors(r)
        self._add_resilience_collectors(r)
        self._add_ranged_collectors(r)
        self._add_quota_collectors(r)
        self._add_tls_collectors(r)
        self._add_status_collectors(r)
        self._add_proxy_collectors(r)
        self._add_replica_collectors(r)

    def _add_disk_collectors(self, r: CollectorRegistry) -> None:
        """The size cap's collectors: usage, limit, evictions, pins, the index."""
        self.cache_bytes = Gauge(
            "gateway_cache_bytes", "Bytes cached per route (each object counted once)",
            ["route"], registry=r)
        self.cache_limit = Gauge(
            "gateway_cache_limit_bytes", "The most the cache may hold now: cache.max_size, "
            "or what keeps cache.min_free of the disk free", registry=r)
        self.pinned_bytes = Gauge(
            "gateway_pinned_bytes", "Bytes of pinned images, never evicted", ["route"],
            registry=r)
        self.evicted_bytes = Counter(
            "gateway_evicted_bytes", "Bytes evicted, by route and reason (size, free_space, "
            "quota, idle)", ["route", "reason"], registry=r)
        self.evicted_objects = Counter(
            "gateway_evicted_objects", "Blobs and manifests evicted, by route and reason",
            ["route", "reason"], registry=r)
        self.evictions = Counter(
            "gateway_evictions", "Images (or unreferenced blobs) evicted, by route and reason",
            ["route", "reason"], registry=r)
        self.index_rebuilds = Counter(
            "gateway_index_rebuilds", "Cache index rebuilt from the store at start, by reason "
            "(missing, corrupt, schema)", ["reason"], registry=r)

    def _add_reload_collectors(self, r: CollectorRegistry) -> None:
        """Live reload of routes.yaml: whether the running config is the file's."""
        self.config_reloads = Counter(
            "gateway_config_reloads", "Reloads of routes.yaml (SIGHUP or a change on disk) by "
            "result: ok, or error (the file was refused whole; the running config stays)",
            ["result"], registry=r)
        self.config_last_success = Gauge(
            "gateway_config_last_reload_success_timestamp_seconds", "When the running config "
            "was loaded (at start, or by the last successful reload)", registry=r)
        self.config_last_ok = Gauge(
            "gateway_config_last_reload_successful", "1 if the last reload succeeded (or none "
            "was tried), 0 if it was refused: the running config is older than the file",
            registry=r)

    def _add_resilience_collectors(self, r: CollectorRegistry) -> None:
        """Fallbacks, circuit breakers, retries, stale-while-revalidate (upstream = URL)."""
        self.breaker_state = Gauge(
            "gateway_upstream_breaker_state", "Circuit breaker of each upstream URL of a "
            "route: 0 closed, 1 open (skipped), 2 half-open (one probe out)",
            ["route", "upstream"], registry=r)
        self.breaker_opens = Counter(
            "gateway_upstream_breaker_opens", "Times a circuit breaker opened",
            ["route", "upstream"], registry=r)
        self.fallbacks = Counter(
            "gateway_upstream_fallbacks", "Requests sent to a fallback upstream because "
            "the ones before it failed or were skipped", ["route", "upstream"], registry=r)
        self.retries = Counter(
            "gateway_upstream_retries", "Upstream requests tried again after a backoff, "
            "by route and reason (down: connect/timeout/5xx, busy: 429)", ["route", "reason"],
            registry=r)
        self.revalidations = Counter(
            "gateway_tag_revalidations", "Background revalidations of tags answered "
            "stale-while-revalidate, by result (unchanged, changed, failed)",
            ["route", "result"], registry=r)

    def _add_ranged_collectors(self, r: CollectorRegistry) -> None:
        """Parallel ranged fetch (cache/ranged.py): how cold blobs came, and their parts."""
        self.blob_transfers = Counter(
            "gateway_blob_transfers", "Cold blob fetches by route and mode: ranged (in "
            "parallel Range parts) or single (one stream: small, or the upstream ignores "
            "Range)", ["route", "mode"], registry=r)
        self.blob_parts = Counter(
            "gateway_blob_parts", "Range parts of ranged blob fetches fetched whole",
            ["route"], registry=r)
        self.blob_part_resumes = Counter(
            "gateway_blob_part_resumes", "Range parts resumed (asking for their missing "
            "tail) after their connection broke", ["route"], registry=r)

    def _add_proxy_collectors(self, r: CollectorRegistry) -> None:
        """The forward proxy (`serve --proxy-listen`, gateway/proxy/)."""
        self.proxy_connects = Counter(
            "gateway_proxy_connects", "CONNECT requests by outcome: intercepted (served by "
            "the gateway, cached), tunnelled (bytes passed through, not cached), refused",
            ["outcome"], registry=r)
        self.proxy_tunnelled_bytes = Counter(
            "gateway_proxy_tunnelled_bytes", "Bytes passed through proxy tunnels, not cached, "
            "by direction (up: client to destination, down)", ["direction"], registry=r)
        self.proxy_leaves = Counter(
            "gateway_proxy_leaf_certificates", "Leaf certificates minted for intercepted "
            "registry hosts", registry=r)

    def _add_replica_collectors(self, r: CollectorRegistry) -> None:
        """Replicas (`redis:`, cache/coordinate_redis.py): how this process's blob fetches
        were coordinated across replicas."""
        self.replica_claims = Counter(
            "gateway_replica_claims", "Blob fetches by how replicas agreed on them: lead "
            "(this replica fetched), follow (streamed from another replica), takeover (the "
            "leader stopped; this replica took its lease), local (Redis unreachable: this "
            "replica fetched on its own)", ["outcome"], registry=r)

    def _add_quota_collectors(self, r: CollectorRegistry) -> None:
        """Upstream quotas: rate-limit headers per account, 429s by kind, the pool's state.
        An account is its username or "anonymous", never a secret."""
        labels = ["route", "account"]
        self.ratelimit_limit = Gauge(
            "gateway_upstream_ratelimit_limit", "Pulls allowed per window, as the upstream's "
            "ratelimit-limit header last said", labels, registry=r)
        self.ratelimit_remaining = Gauge(
            "gateway_upstream_ratelimit_remaining", "Pulls left in the window, as the "
            "upstream's ratelimit-remaining header last said", labels, registry=r)
        self.ratelimit_window = Gauge(
            "gateway_upstream_ratelimit_window_seconds", "The rate-limit window (w=)",
            labels, registry=r)
        self.ratelimit_source = Gauge(
            "gateway_upstream_ratelimit_source_info", "What the upstream counts the pulls "
            "against (docker-ratelimit-source: an address or an account id)",
            [*labels, "source"], registry=r)
        self.rate_limited = Counter(
            "gateway_upstream_rate_limited", "429 answers by kind: pull_limit (the account's "
            "quota is spent) or abuse (no rate-limit headers: the whole upstream backs off)",
            [*labels, "kind"], registry=r)
        self.account_pulls = Counter(
            "gateway_upstream_account_pulls", "Manifest GETs (what Docker Hub counts as "
            "pulls) sent as each account", labels, registry=r)
        self.account_out_until = Gauge(
            "gateway_upstream_account_out_until_seconds", "Unix time until which an account "
            "that ran out of pulls is skipped (0 or past: usable)", labels, registry=r)
        self.upstream_backoff_until = Gauge(
            "gateway_upstream_backoff_until_seconds", "Unix time until which no request goes "
            "to an upstream that answered an abuse 429", ["route"], registry=r)

    def _add_status_collectors(self, r: CollectorRegistry) -> None:
        """What the status page shows besides the counters above: when each kind of
        upstream failure last happened (the counter says how many, not when)."""
        self.upstream_last_error = Gauge(
            "gateway_upstream_last_error_timestamp_seconds", "Unix time of the last upstream "
            "failure of each route, by reason (as gateway_upstream_errors_total)",
            ["route", "reason"], registry=r)

    def upstream_error(self, route: str, reason: str) -> None:
        """One upstream failure: counted, and stamped with the time it happened."""
        self.upstream_errors.labels(route, reason).inc()
        self.upstream_last_error.labels(route, reason).set(time.time())

    def _add_tls_collectors(self, r: CollectorRegistry) -> None:
        """The certificates of the TLS listeners (certs/), for an alert before one expires."""
        self.tls_not_after = Gauge(
            "gateway_tls_certificate_expiry_timestamp_seconds", "Unix time when each loaded "
            "certificate expires (notAfter), by its file under the certificate directory and "
            "its first name", ["certificate", "name"], registry=r)

    def certificates_loaded(self, certificates: Iterable[tuple[str, str, float]]) -> None:
        """The TLS table now in use: (file, first name, notAfter) each; replaces the last."""
        self.tls_not_after.clear()
        for path, name, not_after in certificates:
            self.tls_not_after.labels(path, name).set(not_after)

    def cache_outcome(self, route: str, kind: str, result: str) -> None:
        """Count one cache outcome (hit, miss, stale, coalesced); the child is looked up once."""
        key = (route, kind, result)
        child = self._cache_children.get(key)
        if child is None:
            child = self._cache_children[key] = self.cache.labels(route, kind, result)
        child.inc()

    def observe_request(self, route: str, kind: str, method: str, status: int,
                        seconds: float, body_bytes: int) -> None:
        key = (route, kind, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, kind, method, str(status)),
                        self.request_seconds.labels(route, kind),
                        self.bytes_served.labels(route))
            self._request_children[key] = children
        requests, latency, served = children
        requests.inc()
        latency.observe(seconds)
        if body_bytes:
            served.inc(body_bytes)

    def flush(self) -> None:
        """With workers: write this worker's changed values to its file (at each loop-lag
        tick, and at exit); nothing in one process."""
        if self._flush is not None:
            self._flush()

    async def scrape(self) -> bytes:
        """/metrics: with workers, once every worker wrote what it counted before now."""
        if self._flush is not None:
            await asyncio.sleep(SCRAPE_WAIT)
        return self.render()

    def render(self) -> bytes:
        directory = _multiprocess_directory()
        if directory is None:
            return generate_latest(self.registry)
        self.flush()  # this worker's values, to the moment
        merged = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
