"""Eviction: keeps the cache under `cache.max_size`, each route under its quota, the
filesystem `min_free`, and drops what nobody read for `max_idle`.

A background task, woken when bytes are committed or reserved, evicts between a high
watermark (the limit) and a low one (95% of it) in bounded steps, least recently used
image first. Never evicted: anything being read, a manifest served within the lease
(and what it references), a pinned image. Deleting is the store's; the catalogue
says what an eviction frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..metrics import Metrics
from ..reference import parse_digest
from ..tasks import Background
from .contents import Contents, Entry, Root, Usage
from .store import BlobStore, LocalFiles, blob_key, manifest_key

log = logging.getLogger("gateway.evict")

LOW_WATERMARK = 0.95
STEP_ROOTS = 64  # roots looked at per step: the loop yields between steps
IDLE_CHECK = 60.0  # seconds between looks for idle images when nothing else wakes us


@dataclass(frozen=True)
class Target:
    """How far to evict: down to `low` bytes (of the namespace, or of everything)."""

    namespace: str | None
    reason: str  # size | free_space | quota | idle
    low: int


class Evictor:
    def __init__(self, config: Config, data_dir: Path, contents: Contents, store: BlobStore,
                 metrics: Metrics, clock: Callable[[], float],
                 protected: Callable[[Root], bool]) -> None:
        self._config = config
        self._data_dir = data_dir
        self._contents = contents
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._protected = protected
        self._routes = {r.namespace: r for r in config.routes}
        self.reserved = 0  # bytes of in-flight blobs not yet committed
        self._wake = asyncio.Event()
        self._task = Background("evictor")
        self._forgotten: list[Callable[[Entry], Awaitable[None]]] = []
        # Seconds between looks when nothing wakes us; with workers, other processes commit
        # bytes without waking this one, so the primary looks every few seconds.
        self.look_every = IDLE_CHECK
        # Replicas on one bucket (`redis:`): what the others' catalogues hold, told what
        # this one holds (cache/usage_redis.py); the cap bounds the sum.
        self.elsewhere: Callable[[int], Awaitable[int]] | None = None

    def reconfigure(self, config: Config) -> None:
        """New limits and route quotas (a reload): the next pass uses them, and starts now."""
        self._config = config
        self._routes = {r.namespace: r for r in config.routes}
        self.wake()

    def on_evicted(self, forget: Callable[[Entry], Awaitable[None]]) -> None:
        """Call `forget` for every evicted object (memory caches drop it)."""
        self._forgotten.append(forget)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        # A first pass at once: a cache restarted over its (maybe lowered) cap, or with
        # idle images, must not wait for the first request or IDLE_CHECK.
        self._wake.set()
        self._task.start(self._run())

    async def close(self) -> None:
        await self._task.stop()

    def wake(self) -> None:
        self._wake.set()

    def reserve(self, size: int) -> None:
        """A fetch of `size` bytes begins: count it, and make room now if it needs some."""
        self.reserved += size
        self.wake()

    def release(self, size: int) -> None:
        self.reserved = max(self.reserved - size, 0)

    async def make_room(self, needed: int) -> bool:
        """The disk is full: evict at least `needed` bytes now, if anything may go."""
        if not isinstance(self._store, LocalFiles):  # a remote store frees no local disk
            return False
        usage = await self._contents.usage()
        target = Target(None, "free_space", max(usage.total - needed, 0))
        return await self._evict(target) >= needed

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        # The first pass waits for a rebuild or reconciliation `open` started: before it
        # ends the catalogue may not know what the store holds, and evicts too little.
        with contextlib.suppress(Exception):  # a failed scan is logged where it ran
            await self._contents.settled()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.look_every)
            self._wake.clear()
            try:
                freed = 0
                for target in await self.targets():
                    freed += await self._evict(target)
                freed += await self._evict_idle()
                if freed:  # the gauges show the cache after the pass, not before it
                    self._report(await self._contents.usage())
            except Exception:  # a bad pass must not stop eviction for good
                log.exception("eviction pass failed")
                await asyncio.sleep(1.0)

    async def targets(self) -> list[Target]:
        """What is over its limit now, and how far down to go."""
        usage = await self._contents.usage()
        found = []
        for namespace, used in usage.by_namespace.items():
            route = self._routes.get(namespace)
            quota = route.cache.max_size if route is not None else None
            if quota is not None and used > quota:
                found.append(Target(namespace, "quota", int(quota * LOW_WATERMARK)))
        limit, reason = await self.limit(usage.total)
        if usage.total + self.reserved > limit:
            found.append(Target(None, reason,
                                max(int(limit * LOW_WATERMARK) - self.reserved, 0)))
        self._metrics.cache_limit.set(limit)
        self._report(usage)
        return found

    def _report(self, usage: Usage) -> None:
        """Bytes cached per route; a route whose last object went reads 0, not its past."""
        for namespace in self._routes.keys() | usage.by_namespace.keys():
            self._metrics.cache_bytes.labels(self._route_name(namespace)).set(
                usage.by_namespace.get(namespace, 0))

    async def limit(self, used: int) -> tuple[int, str]:
        """The most the cache may hold: max_size, or what keeps min_free free."""
        limits = self._config.cache
        if not isinstance(self._store, LocalFiles):
            # The objects are not on this disk (S3): only max_size bounds them; min_free
            # of the local disk (the spool) is no reason to delete from the bucket.
            if limits.max_size is None:
                return 1 << 62, "size"
            others = await self.elsewhere(used) if self.elsewhere is not None else 0
            return max(limits.max_size - others, 0), "size"
        disk = await asyncio.to_thread(os.statvfs, self._data_dir)
        total, free = disk.f_blocks * disk.f_frsize, disk.f_bavail * disk.f_frsize
        by_free = used + free - limits.min_free.of(total)
        if limits.max_size is not None and limits.max_size <= by_free:
            return limits.max_size, "size"
        return max(by_free, 0), "free_space"

    async def _evict(self, target: Target) -> int:
        """Evict roots, oldest first, until `target` holds; the bytes freed."""
        freed = 0
        skipped: set[tuple[str, str]] = set()
        while True:
            usage = await self._contents.usage()
            used = usage.total if target.namespace is None else \
                usage.by_namespace.get(target.namespace, 0)
            if used <= target.low:
                return freed
            roots = await self._contents.roots(namespace=target.namespace,
                                               limit=STEP_ROOTS + len(skipped))
            candidates = [r for r in roots if (r.entry.namespace, r.entry.digest) not in skipped]
            if not candidates:
                return freed  # everything left is protected
            for root in candidates:
                if self._protected(root):
                    skipped.add((root.entry.namespace, root.entry.digest))
                    continue
                freed += await self._remove(root, target.reason)
                if used - freed <= target.low:
                    break
            await asyncio.sleep(0)  # a bounded step: let requests run

    async def _evict_idle(self) -> int:
        max_idle = self._config.cache.max_idle
        if max_idle is None:
            return 0
        before = self._clock() - max_idle
        freed = 0
        while roots := [r for r in await self._contents.roots(limit=STEP_ROOTS,
                                                               idle_before=before)
                        if not self._protected(r)]:
            for root in roots:
                freed += await self._remove(root, "idle")
            await asyncio.sleep(0)
        return freed

    async def _remove(self, root: Root, reason: str) -> int:
        removed = await self._contents.remove(root)
        for entry in removed:
            digest = parse_digest(entry.digest)
            key = blob_key(entry.namespace, digest) if entry.kind == "blob" else \
                manifest_key(entry.namespace, digest)
            await self._store.delete(key)
            for forget in self._forgotten:
                await forget(entry)
            route = self._route_name(entry.namespace)
            self._metrics.evicted_bytes.labels(route, reason).inc(entry.size)
            self._metrics.evicted_objects.labels(route, reason).inc()
        if removed:
            self._metrics.evictions.labels(self._route_name(root.entry.namespace),
                                           reason).inc()
        return sum(e.size for e in removed)

    def _route_name(self, namespace: str) -> str:
        route = self._routes.get(namespace)
        return route.name if route is not None else namespace
