"""cache/blobs.py's small blobs kept in memory (issue #12: an image config GET at the
manifest rate): read whole and verified at their first hit, then served from memory;
dropped at once when evicted, looked up in the store again after SMALL_RECHECK, never
kept when their bytes do not match their digest.

The real `Cache` over an `FsStore` in tmp_path, a real `Upstream` to a fake registry,
and a clock that stands still unless the test moves it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cache import Cache, FsStore, MemoryBlob, OpenBlob, blobs
from gateway.cache.found import SMALL_BLOB, SMALL_RECHECK
from gateway.config import CacheLimits, Route
from gateway.metrics import Metrics
from gateway.reference import parse_digest
from gateway.upstream import Upstream
from tests.support.clock import Clock
from tests.support.wait import wait_until

from .conftest import Served, make_cache, make_route

REPO = "owner/img"


@dataclass
class World:
    served: Served
    route: Route
    upstream: Upstream
    cache: Cache
    metrics: Metrics
    clock: Clock

    async def get(self, digest: str) -> Any:
        """A GET's answer from the cache (an open file is closed here)."""
        found = await self.cache.blobs.get(self.upstream, self.route, REPO,
                                           parse_digest(digest))
        if isinstance(found, OpenBlob):
            found.file.close()
        return found

    async def cached(self, data: bytes) -> str:
        """A blob fetched through the cache and committed."""
        digest = self.served.fake.add_blob(data)
        flight, started = self.cache.blobs.fetch(self.upstream, self.route, REPO,
                                                 parse_digest(digest))
        assert started
        await flight.wait_headers()
        assert b"".join([chunk async for chunk in flight.stream()]) == data
        await wait_until(lambda: self.cache.blobs.inflight(self.route, parse_digest(digest))
                         is None, what="the commit")
        return digest

    def path(self, digest: str) -> Path:
        store = self.cache.store
        assert isinstance(store, FsStore)
        algorithm, hex_digest = digest.split(":")
        return store.root / self.route.namespace / "blobs" / algorithm / hex_digest[:2] / \
            hex_digest

    def hits(self) -> float:
        return self.metrics.registry.get_sample_value(
            "gateway_cache_requests_total",
            {"route": self.route.name, "kind": "blob", "result": "hit"}) or 0.0

    def upstream_gets(self, digest: str) -> int:
        return self.served.fake.count("GET", f"/v2/{REPO}/blobs/{digest}")


@pytest.fixture
async def world(registry: Callable[..., Awaitable[Served]],
                tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[World]]]:
    opened: list[tuple[Cache, Upstream]] = []

    async def make() -> World:
        served = await registry()
        route = make_route(served.url)
        metrics = Metrics()
        upstream = Upstream(route, metrics)
        await upstream.start()
        clock = Clock(frozen=1_800_000_000.0)
        cache = make_cache(route, tmp_path / "data", metrics, clock)
        await cache.open()
        opened.append((cache, upstream))
        return World(served, route, upstream, cache, metrics, clock)

    yield make
    for cache, upstream in opened:
        await cache.close()
        await upstream.close()


async def test_a_small_blob_is_served_from_memory_until_it_is_looked_up_again(
        world: Callable[[], Awaitable[World]]) -> None:
    w = await world()
    data = os.urandom(4000)
    digest = await w.cached(data)
    first = await w.get(digest)
    assert isinstance(first, MemoryBlob) and first.data == data and first.size == len(data)
    # Deleted behind this process's back (another worker, `cache rm`): memory answers
    # until SMALL_RECHECK, with the verified bytes, and each answer is a hit.
    w.path(digest).unlink()
    again = await w.get(digest)
    assert isinstance(again, MemoryBlob) and again.data == data
    assert w.hits() == 2
    w.clock.advance(SMALL_RECHECK)
    refetched = await w.get(digest)
    assert isinstance(refetched, tuple), "served from memory past its recheck"
    assert w.upstream_gets(digest) == 1  # (counted once the flight's request is made)
    flight, started = refetched
    assert started
    await flight.wait_headers()
    assert b"".join([chunk async for chunk in flight.stream()]) == data
    assert w.upstream_gets(digest) == 2


async def test_an_evicted_small_blob_is_never_served_from_memory(
        world: Callable[[], Awaitable[World]]) -> None:
    w = await world()
    data = os.urandom(3000)
    digest = await w.cached(data)
    assert isinstance(await w.get(digest), MemoryBlob)
    # A cap smaller than the blob: the evictor deletes it (the clock stands still, so
    # only the eviction itself can make memory let go).
    w.cache.reconfigure(dataclasses.replace(w.cache.config, cache=CacheLimits(
        max_size=1000, lease=0.0)))
    await wait_until(lambda: not w.path(digest).exists(), what="the eviction")
    found = await w.get(digest)
    assert isinstance(found, tuple), f"an evicted blob was answered from memory: {found}"
    flight, started = found
    assert started
    await flight.wait_headers()
    assert b"".join([chunk async for chunk in flight.stream()]) == data
    assert w.upstream_gets(digest) == 2


async def test_a_small_blob_that_does_not_match_its_digest_is_not_kept(
        world: Callable[[], Awaitable[World]]) -> None:
    w = await world()
    data = os.urandom(2000)
    digest = await w.cached(data)
    w.path(digest).write_bytes(os.urandom(len(data)))  # rotted on disk
    for _ in range(2):
        found = await w.get(digest)
        assert not isinstance(found, MemoryBlob), "unverified bytes were kept in memory"
        assert isinstance(found, OpenBlob)  # served as it is stored, as before


async def test_only_small_blobs_are_kept(world: Callable[[], Awaitable[World]]) -> None:
    w = await world()
    small = await w.cached(os.urandom(SMALL_BLOB))
    large = await w.cached(os.urandom(SMALL_BLOB + 1))
    for _ in range(2):
        assert isinstance(await w.get(small), MemoryBlob)
        assert isinstance(await w.get(large), OpenBlob)


async def test_memory_is_bounded(world: Callable[[], Awaitable[World]],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Least recently read first out: the bound holds however many configs are read."""
    monkeypatch.setattr(blobs, "SMALL_MEMORY", 3 * (SMALL_BLOB + 200))  # three of them
    w = await world()
    digests = [await w.cached(os.urandom(SMALL_BLOB)) for _ in range(4)]
    for digest in digests:
        assert isinstance(await w.get(digest), MemoryBlob)
    for digest in digests:
        w.path(digest).unlink()
    # The first was pushed out: it is looked up in the store (gone: fetched again).
    assert isinstance(await w.get(digests[0]), tuple)
    assert all([isinstance(await w.get(d), MemoryBlob) for d in digests[1:]])
