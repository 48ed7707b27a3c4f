"""cache/: blobs and manifests by digest, tags with TTL and stale-if-error, single flight.

The real `Cache` over an `FsStore` in tmp_path, talking through a real `Upstream` to an
in-process fake registry; time is moved with the clock the cache is given.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.cache import (
    BlobFlight,
    Cache,
    FetchAborted,
    FsStore,
    IntegrityError,
    ManifestResult,
)
from gateway.cache.coordinate_files import FileCoordinator
from gateway.cache.manifests import ABSENT_RECHECK
from gateway.cache.store import blob_key
from gateway.config import Route
from gateway.errors import RegistryError, UpstreamError
from gateway.metrics import Metrics
from gateway.reference import Reference, parse_digest
from gateway.upstream import Upstream
from tests.support.clock import Clock
from tests.support.fake_registry import FakeRegistry, image_manifest, stream_in_parts
from tests.support.images import ACCEPT_ALL_MANIFESTS, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.support.images import sha256_digest as digest_of
from tests.support.transfers import FIRST_RANGE
from tests.support.wait import wait_until

from .conftest import Served, make_cache, make_route

REPO = "owner/img"
MiB = 1 << 20


@dataclass
class World:
    served: Served
    route: Route
    upstream: Upstream
    cache: Cache
    store: FsStore
    metrics: Metrics
    clock: Clock

    @property
    def fake(self) -> FakeRegistry:
        return self.served.fake

    async def manifest(self, reference: str, accept: str | None = None) -> ManifestResult:
        return await self.cache.manifests.get(self.upstream, self.route, REPO,
                                              Reference.parse(reference), accept)

    def flight(self, digest: str) -> tuple[BlobFlight, bool]:
        return self.cache.blobs.fetch(self.upstream, self.route, REPO, parse_digest(digest))

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"route": self.route.name,
                                                              **labels})
        return 0.0 if value is None else value

    async def settled(self, digest: str) -> None:
        """Wait until the blob's fetch is over (committed or abandoned)."""
        await wait_until(
            lambda: self.cache.blobs.inflight(self.route, parse_digest(digest)) is None,
            what="the fetch to end")


MakeWorld = Callable[..., Awaitable[World]]


@pytest.fixture
async def world(registry: Callable[..., Awaitable[Served]], tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeWorld]:
    caches: list[Cache] = []
    upstreams: list[Upstream] = []
    clock = Clock()

    async def make(*, served: Served | None = None, store: FsStore | None = None,
                   name: str = "fake.test", **route_overrides: Any) -> World:
        served = served or await registry()
        route = make_route(served.url, name=name, **route_overrides)
        metrics = Metrics()
        upstream = Upstream(route, metrics)
        await upstream.start()
        upstreams.append(upstream)
        cache = make_cache(route, tmp_path / "data", metrics, clock, store=store)
        store = cache.store
        assert isinstance(store, FsStore)
        await cache.open()
        caches.append(cache)
        return World(served, route, upstream, cache, store, metrics, clock)

    yield make
    for cache in caches:
        await cache.close()
    for upstream in upstreams:
        await upstream.close()


async def read_all(flight: BlobFlight, start: int = 0, end: int | None = None) -> bytes:
    """Read a flight the way the API does: wait for headers, then follow the bytes."""
    await flight.wait_headers()
    out = bytearray()
    async for chunk in flight.stream(start, end):
        out += chunk
    return bytes(out)


async def follow(flight: BlobFlight, into: bytearray) -> None:
    async for chunk in flight.stream():
        into += chunk


def blob_path(world: World, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":")
    return world.store.root / world.route.namespace / "blobs" / algorithm / hex_digest[:2] / \
        hex_digest


def spool_files(world: World) -> list[Path]:
    """What the process's spool holds besides its owner lock."""
    return [p for p in world.cache.spool.path.iterdir() if p.name != ".owner"]


# ------------------------------------------------------------ blob flights


async def test_concurrent_readers_share_one_upstream_fetch(world: MakeWorld) -> None:
    w = await world()
    data = os.urandom(3 * MiB + 123)
    digest = w.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:1000], data[1000:]], gates=[None, gate],
                                     content_length=len(data))

    w.fake.override("GET", path, slow)
    flights = [w.flight(digest) for _ in range(6)]
    assert [started for _, started in flights] == [True] + [False] * 5
    flight = flights[0][0]
    assert all(f is flight for f, _ in flights)
    readers = [asyncio.create_task(read_all(f)) for f, _ in flights]
    await wait_until(lambda: flight.written >= 1000, what="the first bytes")
    gate.set()
    results = await asyncio.gather(*readers)
    assert all(result == data for result in results)
    assert w.fake.count("GET", path) == 1

    await w.settled(digest)
    assert blob_path(w, digest).read_bytes() == data
    cached = await w.cache.blobs.cached_size(w.route, parse_digest(digest))
    assert cached == len(data)
    assert spool_files(w) == []
    # A reader that comes after the commit starts no new fetch.
    assert w.cache.blobs.inflight(w.route, parse_digest(digest)) is None


async def test_reader_joining_after_the_fetch_finished_reads_the_committed_file(
        world: MakeWorld) -> None:
    w = await world()
    data = os.urandom(100_000)
    digest = w.fake.add_blob(data)
    flight, started = w.flight(digest)
    assert started
    assert await read_all(flight) == data
    await w.settled(digest)
    # The spool is gone (renamed into the store); a late reader of the same object
    # must still get every byte.
    assert await read_all(flight) == data


async def test_wrong_bytes_are_never_kept_and_readers_are_aborted(world: MakeWorld) -> None:
    w = await world()
    good = os.urandom(2 * MiB)
    digest = digest_of(good)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    w.fake.blobs[digest] = bytes(bad)  # the upstream serves other bytes under the digest
    path = f"/v2/{REPO}/blobs/{digest}"

    flight, _ = w.flight(digest)
    readers = [asyncio.create_task(read_all(w.flight(digest)[0])) for _ in range(3)]
    for reader in readers:
        with pytest.raises(FetchAborted):
            await reader
    await w.settled(digest)
    assert isinstance(flight.error, IntegrityError)
    assert (flight.error.code, flight.error.status) == ("DIGEST_INVALID", 502)
    assert not flight.done
    assert not blob_path(w, digest).exists()
    assert await w.cache.blobs.cached_size(w.route, parse_digest(digest)) is None
    assert spool_files(w) == []
    assert w.metric("gateway_integrity_failures_total", kind="blob") == 1

    # The next request fetches again, and once the upstream is right, keeps it.
    w.fake.blobs[digest] = good
    again, started = w.flight(digest)
    assert started and again is not flight
    assert await read_all(again) == good
    await w.settled(digest)
    assert w.fake.count("GET", path) == 2
    assert blob_path(w, digest).read_bytes() == good


async def test_truncated_transfer_is_resumed_with_range(world: MakeWorld) -> None:
    w = await world()
    data = os.urandom(3 * MiB)
    digest = w.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"
    half = len(data) // 2

    async def cut_first(request: web.Request) -> web.StreamResponse:
        if w.fake.count("GET", path) == 1:
            return await stream_in_parts(request, [data[:half]], content_length=len(data),
                                         cut=True)
        return w.fake.blob_response(request, digest)

    w.fake.override("GET", path, cut_first)
    flight, _ = w.flight(digest)
    assert await read_all(flight) == data
    await w.settled(digest)
    first, second = w.fake.seen("GET", path)
    assert first.headers.get("Range") == FIRST_RANGE
    assert second.headers["Range"] == f"bytes={flight.written - (len(data) - half)}-"
    assert second.headers["Range"] == f"bytes={half}-"
    assert flight.resumes == 1
    assert w.metric("gateway_upstream_bytes_total") == len(data)  # nothing fetched twice
    assert w.metric("gateway_upstream_resumed_transfers_total") == 1
    assert blob_path(w, digest).read_bytes() == data


async def test_resume_against_an_upstream_that_ignores_range(world: MakeWorld) -> None:
    w = await world()
    w.fake.honour_range = False
    data = os.urandom(2 * MiB)
    digest = w.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"
    half = MiB + 7

    async def cut_first(request: web.Request) -> web.StreamResponse:
        if w.fake.count("GET", path) == 1:
            return await stream_in_parts(request, [data[:half]], content_length=len(data),
                                         cut=True)
        return w.fake.blob_response(request, digest)  # 200 with everything

    w.fake.override("GET", path, cut_first)
    flight, _ = w.flight(digest)
    assert await read_all(flight) == data
    await w.settled(digest)
    assert w.fake.count("GET", path) == 2
    assert blob_path(w, digest).read_bytes() == data


async def test_a_transfer_that_keeps_breaking_gives_up(world: MakeWorld) -> None:
    w = await world()
    data = os.urandom(MiB)
    digest = w.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"

    async def always_cut(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [b"x"], content_length=len(data), cut=True)

    w.fake.override("GET", path, always_cut)
    flight, _ = w.flight(digest)
    with pytest.raises(FetchAborted):
        await read_all(flight)
    await w.settled(digest)
    assert isinstance(flight.error, UpstreamError) and flight.error.status == 502
    assert 2 <= w.fake.count("GET", path) <= 5
    assert not blob_path(w, digest).exists()
    assert spool_files(w) == []


async def test_upstream_error_reaches_every_reader(world: MakeWorld) -> None:
    w = await world()
    digest = digest_of(b"missing")
    flight, _ = w.flight(digest)
    joined, started = w.flight(digest)
    assert not started
    for f in (flight, joined):
        with pytest.raises(RegistryError) as caught:
            await f.wait_headers()
        assert (caught.value.code, caught.value.status) == ("BLOB_UNKNOWN", 404)
    await w.settled(digest)
    assert spool_files(w) == []


async def test_cancelled_reader_does_not_cancel_the_fetch(world: MakeWorld) -> None:
    w = await world()
    data = os.urandom(2 * MiB)
    digest = w.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:1000], data[1000:]], gates=[None, gate],
                                     content_length=len(data))

    w.fake.override("GET", path, slow)
    flight, _ = w.flight(digest)
    got = bytearray()
    reader = asyncio.create_task(follow(flight, got))
    await wait_until(lambda: len(got) >= 999, what="the first bytes")
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert flight.readers == 0
    gate.set()
    await w.settled(digest)
    assert flight.done and flight.error is None
    assert blob_path(w, digest).read_bytes() == data
    assert w.fake.count("GET", path) == 1


async def test_a_stop_while_a_verified_blob_is_committed_lets_the_commit_end(
        world: MakeWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing the cache cancels its fetches; one whose bytes are verified still lands in
    the store and the catalogue (a clean stop rescans nothing, so a file the catalogue
    missed would never be counted against the cap)."""
    w = await world()
    data = os.urandom(MiB)
    digest = w.fake.add_blob(data)
    adopting, gate = asyncio.Event(), asyncio.Event()
    adopt = w.store.adopt

    async def slow_adopt(key: str, file: Path) -> None:
        adopting.set()
        await gate.wait()
        await adopt(key, file)

    monkeypatch.setattr(w.store, "adopt", slow_adopt)
    flight, _ = w.flight(digest)
    await asyncio.wait_for(adopting.wait(), 10)
    closing = asyncio.create_task(w.cache.blobs.flights.close())  # cancels the fetch
    await asyncio.sleep(0.05)
    assert not closing.done()  # it waits for the commit under way
    gate.set()
    await asyncio.wait_for(closing, 10)
    assert flight.done
    assert blob_path(w, digest).read_bytes() == data
    assert (await w.cache.contents.usage()).total == len(data)


async def test_orphaned_fetch_over_the_limit_is_abandoned(world: MakeWorld) -> None:
    w = await world(orphan_fetch_limit=0)
    data = os.urandom(MiB)
    digest = w.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"
    gates = [asyncio.Event(), asyncio.Event()]

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:1000], data[1000:2000], data[2000:]],
                                     gates=[None, *gates], content_length=len(data))

    w.fake.override("GET", path, slow)
    flight, _ = w.flight(digest)
    got = bytearray()
    reader = asyncio.create_task(follow(flight, got))
    await wait_until(lambda: len(got) >= 999, what="the first bytes")
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    gates[0].set()
    await w.settled(digest)
    gates[1].set()
    assert not flight.done and flight.error is not None
    assert not blob_path(w, digest).exists()
    assert spool_files(w) == []


async def test_the_reader_that_started_a_fetch_keeps_it_alive(world: MakeWorld) -> None:
    """The request that starts a fetch is waiting for it from the start: the orphan
    limit must not abandon a fetch before that reader got round to reading."""
    w = await world(orphan_fetch_limit=MiB)
    data = os.urandom(4 * MiB)
    digest = w.fake.add_blob(data)
    flight, _ = w.flight(digest)
    assert await read_all(flight) == data
    await w.settled(digest)
    assert flight.done


async def test_last_byte_is_held_back_until_verified(world: MakeWorld) -> None:
    w = await world()
    data = os.urandom(300_000)
    digest = w.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"
    end = asyncio.Event()

    async def all_but_the_end(request: web.Request) -> web.StreamResponse:
        # Chunked: the gateway cannot know the body is over until the final chunk.
        return await stream_in_parts(request, [data], end_gate=end)

    w.fake.override("GET", path, all_but_the_end)
    flight, _ = w.flight(digest)
    got = bytearray()
    reader = asyncio.create_task(follow(flight, got))
    await wait_until(lambda: flight.written == len(data), what="every byte upstream")
    await wait_until(lambda: len(got) == len(data) - 1, what="the reader to catch up")
    await asyncio.sleep(0.05)
    assert len(got) == len(data) - 1 and not reader.done()
    end.set()
    await reader
    assert bytes(got) == data


async def test_corrupt_chunked_blob_never_reaches_a_reader_whole(world: MakeWorld) -> None:
    w = await world()
    data = os.urandom(300_000)
    digest = digest_of(data + b"!")  # what the client asked for is not what comes
    path = f"/v2/{REPO}/blobs/{digest}"
    end = asyncio.Event()

    async def wrong(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data], end_gate=end)

    w.fake.override("GET", path, wrong)
    flight, _ = w.flight(digest)
    got = bytearray()
    reader = asyncio.create_task(follow(flight, got))
    await wait_until(lambda: flight.written == len(data), what="every byte upstream")
    end.set()
    with pytest.raises(FetchAborted):
        await reader
    assert len(got) < len(data)
    await w.settled(digest)
    assert not blob_path(w, digest).exists()


async def test_ranges_are_served_from_the_growing_file(world: MakeWorld) -> None:
    w = await world()
    data = os.urandom(2 * MiB)
    digest = w.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:MiB], data[MiB:]], gates=[None, gate],
                                     content_length=len(data))

    w.fake.override("GET", path, slow)
    flight, _ = w.flight(digest)
    # A range inside what has arrived is answered before the rest comes.
    assert await asyncio.wait_for(read_all(flight, 10, 5000), 5) == data[10:5000]
    gate.set()
    assert await read_all(flight, MiB - 5, len(data)) == data[MiB - 5:]
    await w.settled(digest)


async def test_blobs_of_two_routes_are_kept_apart(world: MakeWorld,
                                                  registry: Callable[..., Awaitable[Served]]
                                                  ) -> None:
    a = await world(name="a.test")
    b = await world(name="b.test", store=a.store)
    data = os.urandom(10_000)
    digest = a.fake.add_blob(data)
    assert await read_all(a.flight(digest)[0]) == data
    await a.settled(digest)
    assert await a.cache.blobs.cached_size(a.route, parse_digest(digest)) is not None
    assert await b.cache.blobs.cached_size(b.route, parse_digest(digest)) is None


# -------------------------------------------------------------- manifests


async def test_manifest_by_digest_is_fetched_once_and_kept(world: MakeWorld) -> None:
    w = await world()
    body = image_manifest(b"layer")
    digest = w.fake.add_manifest(REPO, body)
    first = await w.manifest(digest)
    assert (first.cache, first.manifest.body, first.manifest.digest) == ("MISS", body, digest)
    assert first.manifest.media_type == OCI_MANIFEST
    second = await w.manifest(digest)
    assert (second.cache, second.manifest.body) == ("HIT", body)
    assert w.fake.count() == 1
    # Kept on disk: another cache over the same store answers without the upstream.
    again = await world(served=w.served, store=w.store)
    assert (await again.manifest(digest)).cache == "HIT"
    assert w.fake.count() == 1


@pytest.mark.parametrize("claimed", ["requested", "of the bytes sent", "none"])
async def test_manifest_by_digest_is_verified(world: MakeWorld, claimed: str) -> None:
    w = await world()
    body = image_manifest(b"layer")
    digest = w.fake.add_manifest(REPO, body)
    tampered = image_manifest(b"other layer")
    headers = {"Content-Type": OCI_MANIFEST}
    if claimed != "none":
        # An upstream may claim the digest asked for, or one that matches what it sent.
        headers["Docker-Content-Digest"] = digest if claimed == "requested" else \
            digest_of(tampered)
    w.fake.respond("GET", f"/v2/{REPO}/manifests/{digest}", 200, body=tampered,
                   headers=headers)
    with pytest.raises(IntegrityError) as caught:
        await w.manifest(digest)
    assert (caught.value.code, caught.value.status) == ("DIGEST_INVALID", 502)
    assert w.metric("gateway_integrity_failures_total", kind="manifest") == 1
    # Nothing was kept: the next request asks upstream again.
    w.fake.overrides.clear()
    assert (await w.manifest(digest)).cache == "MISS"
    assert w.fake.count("GET") == 2


async def test_tag_whose_claimed_digest_lies_is_refused(world: MakeWorld) -> None:
    w = await world()
    body = image_manifest(b"layer")
    path = f"/v2/{REPO}/manifests/v1"
    w.fake.respond("GET", path, 200, body=body, headers={
        "Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest_of(b"something else")})
    with pytest.raises(IntegrityError):
        await w.manifest("v1")
    w.fake.overrides.clear()
    w.fake.add_manifest(REPO, body, tag="v1")
    assert (await w.manifest("v1")).cache == "MISS"


async def test_manifest_that_is_not_json_is_refused(world: MakeWorld) -> None:
    w = await world()
    w.fake.respond("GET", f"/v2/{REPO}/manifests/v1", 200, body=b"<html>",
                   headers={"Content-Type": OCI_MANIFEST})
    with pytest.raises(RegistryError) as caught:
        await w.manifest("v1")
    assert (caught.value.code, caught.value.status) == ("MANIFEST_INVALID", 502)


async def test_concurrent_manifest_requests_coalesce(world: MakeWorld) -> None:
    w = await world()
    body = image_manifest(b"layer")
    w.fake.add_manifest(REPO, body, tag="v1")
    path = f"/v2/{REPO}/manifests/v1"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return w.fake.manifest_response(request, REPO, "v1")

    w.fake.override("GET", path, slow)
    tasks = [asyncio.create_task(w.manifest("v1")) for _ in range(5)]
    await wait_until(lambda: w.fake.count("GET", path) == 1, what="the upstream request")
    await asyncio.sleep(0.02)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert sorted(r.cache for r in results) == ["COALESCED"] * 4 + ["MISS"]
    assert all(r.manifest.body == body for r in results)
    assert w.fake.count("GET", path) == 1


async def test_a_blob_another_worker_stored_after_our_look_is_not_a_miss(
        world: MakeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers on one data directory: this one looked and did not find the blob, another
    committed it, then this one took the lead. It serves the stored file; the GET is
    coalesced (told so before its answer), not a miss, and the upstream sends nothing."""
    w = await world()
    data = os.urandom(256 << 10)  # a file, not a small blob kept in memory
    digest = w.fake.add_blob(data)
    metrics = Metrics()
    cache = make_cache(w.route, tmp_path / "shared", metrics, w.clock,
                       coordinator=FileCoordinator(tmp_path / "locks"))
    await cache.open()
    try:
        blobs = cache.blobs
        look = blobs._open

        async def look_then_another_commits(*args: Any, **kwargs: Any) -> Any:
            found = await look(*args, **kwargs)
            path = cache.store.local_path(blob_key(w.route.namespace, parse_digest(digest)))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return found

        monkeypatch.setattr(blobs, "_open", look_then_another_commits)
        got = await blobs.get(w.upstream, w.route, REPO, parse_digest(digest))
        assert isinstance(got, tuple)
        flight, started = got
        assert started is False
        assert await read_all(flight) == data
        assert w.fake.count("GET", f"/v2/{REPO}/blobs/{digest}") == 0

        def outcome(result: str) -> float | None:
            return metrics.registry.get_sample_value("gateway_cache_requests_total", {
                "route": w.route.name, "kind": "blob", "result": result})

        assert (outcome("miss"), outcome("coalesced")) == (None, 1.0)
    finally:
        await cache.close()


# -------------------------------------------------------------------- tags


async def test_tag_is_answered_from_cache_within_its_ttl(world: MakeWorld) -> None:
    w = await world(tag_ttl=60)
    body = image_manifest(b"v1")
    w.fake.add_manifest(REPO, body, tag="v1")
    assert (await w.manifest("v1")).cache == "MISS"
    w.clock.advance(59)
    result = await w.manifest("v1")
    assert (result.cache, result.manifest.body) == ("HIT", body)
    assert w.fake.count() == 1


async def test_expired_tag_is_revalidated_with_head(world: MakeWorld) -> None:
    w = await world(tag_ttl=60)
    body = image_manifest(b"v1")
    digest = w.fake.add_manifest(REPO, body, tag="v1")
    path = f"/v2/{REPO}/manifests/v1"
    await w.manifest("v1")
    w.clock.advance(61)
    result = await w.manifest("v1")
    assert (result.cache, result.manifest.body, result.manifest.digest) == ("HIT", body, digest)
    assert (w.fake.count("GET", path), w.fake.count("HEAD", path)) == (1, 1)
    # The HEAD confirmed the tag: a fresh TTL, no upstream request.
    w.clock.advance(59)
    assert (await w.manifest("v1")).cache == "HIT"
    assert w.fake.count() == 2


async def test_moved_tag_is_fetched_again(world: MakeWorld) -> None:
    w = await world(tag_ttl=60)
    w.fake.add_manifest(REPO, image_manifest(b"v1"), tag="v1")
    await w.manifest("v1")
    new_body = image_manifest(b"v1 rebuilt")
    new_digest = w.fake.add_manifest(REPO, new_body, tag="v1")
    w.clock.advance(61)
    result = await w.manifest("v1")
    assert (result.cache, result.manifest.body, result.manifest.digest) == (
        "MISS", new_body, new_digest)
    path = f"/v2/{REPO}/manifests/v1"
    assert (w.fake.count("GET", path), w.fake.count("HEAD", path)) == (2, 1)
    assert (await w.manifest("v1")).manifest.body == new_body
    assert w.fake.count() == 3


async def test_tags_are_kept_on_disk(world: MakeWorld) -> None:
    w = await world(tag_ttl=60)
    body = image_manifest(b"v1")
    w.fake.add_manifest(REPO, body, tag="v1")
    await w.manifest("v1")
    again = await world(served=w.served, store=w.store, tag_ttl=60)
    result = await again.manifest("v1")
    assert (result.cache, result.manifest.body) == ("HIT", body)
    assert w.fake.count() == 1


async def test_cached_tag_of_another_media_type_is_not_served(world: MakeWorld) -> None:
    w = await world(tag_ttl=600)
    w.fake.add_manifest(REPO, image_manifest(b"v1"), tag="v1")
    assert (await w.manifest("v1", accept=OCI_MANIFEST)).cache == "MISS"
    assert (await w.manifest("v1", accept=OCI_MANIFEST)).cache == "HIT"
    # Only Docker v2 is acceptable: the cached OCI manifest is not, so ask upstream.
    assert (await w.manifest("v1", accept=DOCKER_MANIFEST)).cache == "MISS"
    assert w.fake.count("GET") == 2
    assert w.fake.seen("GET")[-1].headers["Accept"] == DOCKER_MANIFEST


async def test_a_client_that_takes_no_index_costs_no_file_lookup_per_get(
        world: MakeWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """Such a client's GET looks for the tag's WIDE view first; where only its NARROW
    view is kept, the missing one is remembered (ABSENT_RECHECK), not looked for in the
    store on every GET; a view stored later is found at once."""
    w = await world(tag_ttl=600)
    w.fake.add_manifest(REPO, image_manifest(b"v1"), tag="v1")
    assert (await w.manifest("v1", accept=OCI_MANIFEST)).cache == "MISS"
    reads: list[str] = []
    real_get = w.store.get

    async def counting_get(key: str) -> bytes | None:
        reads.append(key)
        return await real_get(key)

    monkeypatch.setattr(w.store, "get", counting_get)
    for _ in range(3):
        assert (await w.manifest("v1", accept=OCI_MANIFEST)).cache == "HIT"
    assert reads == []
    w.clock.advance(ABSENT_RECHECK + 0.1)
    assert (await w.manifest("v1", accept=OCI_MANIFEST)).cache == "HIT"
    assert len(reads) == 1 and "_tags" in reads[0]  # looked again, once
    # A client that takes an index stores the WIDE view: the narrow one now finds it.
    assert (await w.manifest("v1", accept=ACCEPT_ALL_MANIFESTS)).cache == "MISS"
    assert (await w.manifest("v1", accept=OCI_MANIFEST)).cache == "HIT"
    assert w.fake.count("GET") == 2


async def test_a_manifest_negotiated_down_does_not_stand_for_the_tag(world: MakeWorld) -> None:
    """An old client that cannot take an index gets a platform's manifest for the tag;
    the next client, which can, must still get the index, not that platform."""
    w = await world(tag_ttl=600)
    platform = image_manifest(b"amd64")
    platform_digest = w.fake.add_manifest(REPO, platform)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": platform_digest, "size": len(platform),
         "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()

    async def negotiate(request: web.Request) -> web.StreamResponse:
        if OCI_INDEX in request.headers.get("Accept", ""):
            return web.Response(body=index, headers={"Content-Type": OCI_INDEX})
        return web.Response(body=platform, headers={"Content-Type": OCI_MANIFEST})

    w.fake.override("GET", f"/v2/{REPO}/manifests/multi", negotiate)
    old = await w.manifest("multi", accept=OCI_MANIFEST)
    assert old.manifest.body == platform
    wide = await w.manifest("multi")
    assert wide.manifest.body == index and wide.cache == "MISS"
    assert (await w.manifest("multi")).cache == "HIT"
    assert (await w.manifest("multi")).manifest.body == index


@pytest.mark.parametrize("failure", ["500", "503", "429", "refused"])
async def test_stale_if_error(world: MakeWorld, failure: str) -> None:
    w = await world(tag_ttl=60, stale_if_error=3600)
    body = image_manifest(b"v1")
    w.fake.add_manifest(REPO, body, tag="v1")
    path = f"/v2/{REPO}/manifests/v1"
    await w.manifest("v1")
    if failure == "refused":
        await w.served.stop()
    else:
        w.fake.respond("HEAD", path, int(failure))
        w.fake.respond("GET", path, int(failure))
    w.clock.advance(61)
    result = await w.manifest("v1")
    assert (result.cache, result.manifest.body) == ("STALE", body)
    assert w.metric("gateway_stale_served_total") == 1
    # Past tag_ttl + stale_if_error the failure is the answer.
    w.clock.advance(3600)
    with pytest.raises(UpstreamError) as caught:
        await w.manifest("v1")
    assert caught.value.status == (429 if failure == "429" else 502)


async def test_stale_if_error_never(world: MakeWorld) -> None:
    w = await world(tag_ttl=60, stale_if_error=0)
    w.fake.add_manifest(REPO, image_manifest(b"v1"), tag="v1")
    await w.manifest("v1")
    w.fake.respond("HEAD", f"/v2/{REPO}/manifests/v1", 503)
    w.clock.advance(61)
    with pytest.raises(UpstreamError) as caught:
        await w.manifest("v1")
    assert (caught.value.code, caught.value.status) == ("UNAVAILABLE", 502)


@pytest.mark.parametrize("status", [401, 403])
async def test_denied_is_not_answered_stale(world: MakeWorld, status: int) -> None:
    w = await world(tag_ttl=60)
    w.fake.add_manifest(REPO, image_manifest(b"v1"), tag="v1")
    await w.manifest("v1")
    w.fake.respond("HEAD", f"/v2/{REPO}/manifests/v1", status)
    w.clock.advance(61)
    with pytest.raises(UpstreamError) as caught:
        await w.manifest("v1")
    assert caught.value.code in ("DENIED", "UNAUTHORIZED")


async def test_deleted_tag_is_not_answered_stale(world: MakeWorld) -> None:
    w = await world(tag_ttl=60, negative_ttl=30)
    w.fake.add_manifest(REPO, image_manifest(b"v1"), tag="v1")
    await w.manifest("v1")
    del w.fake.tags[(REPO, "v1")]
    w.clock.advance(61)
    with pytest.raises(UpstreamError) as caught:
        await w.manifest("v1")
    assert (caught.value.code, caught.value.status) == ("MANIFEST_UNKNOWN", 404)


async def test_missing_tag_is_remembered_for_negative_ttl(world: MakeWorld) -> None:
    w = await world(negative_ttl=30)
    path = f"/v2/{REPO}/manifests/v1"
    for _ in range(3):
        with pytest.raises(RegistryError) as caught:
            await w.manifest("v1")
        assert (caught.value.code, caught.value.status) == ("MANIFEST_UNKNOWN", 404)
    assert w.fake.count("GET", path) == 1
    body = image_manifest(b"now it exists")
    w.fake.add_manifest(REPO, body, tag="v1")
    w.clock.advance(29)
    with pytest.raises(RegistryError):
        await w.manifest("v1")
    w.clock.advance(2)
    assert (await w.manifest("v1")).manifest.body == body
    assert w.fake.count("GET", path) == 2


async def test_negative_ttl_zero_remembers_nothing(world: MakeWorld) -> None:
    w = await world(negative_ttl=0)
    for _ in range(2):
        with pytest.raises(RegistryError):
            await w.manifest("v1")
    assert w.fake.count("GET") == 2


async def test_tags_of_two_routes_are_kept_apart(world: MakeWorld) -> None:
    a = await world(name="a.test")
    b = await world(name="b.test", store=a.store)
    body_a, body_b = image_manifest(b"from a"), image_manifest(b"from b")
    a.fake.add_manifest(REPO, body_a, tag="v1")
    b.fake.add_manifest(REPO, body_b, tag="v1")
    assert (await a.manifest("v1")).manifest.body == body_a
    assert (await b.manifest("v1")).manifest.body == body_b
    assert (a.fake.count(), b.fake.count()) == (1, 1)



async def test_missing_digest_is_remembered_per_repository(world: MakeWorld) -> None:
    w = await world(negative_ttl=30)
    body = image_manifest(b"only in other/img")
    digest = w.fake.add_manifest("other/img", body)
    for _ in range(2):
        with pytest.raises(RegistryError) as caught:
            await w.manifest(digest)  # in REPO, where the upstream does not have it
        assert (caught.value.code, caught.value.status) == ("MANIFEST_UNKNOWN", 404)
    assert w.fake.count("GET", f"/v2/{REPO}/manifests/{digest}") == 1
    # Another repository that has it is not affected by what REPO's 404 taught.
    result = await w.cache.manifests.get(w.upstream, w.route, "other/img",
                                         Reference.parse(digest), None)
    assert (result.cache, result.manifest.body) == ("MISS", body)


async def test_cancelled_manifest_request_does_not_cancel_the_fetch(world: MakeWorld) -> None:
    w = await world()
    body = image_manifest(b"layer")
    w.fake.add_manifest(REPO, body, tag="v1")
    path = f"/v2/{REPO}/manifests/v1"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return w.fake.manifest_response(request, REPO, "v1")

    w.fake.override("GET", path, slow)
    first = asyncio.create_task(w.manifest("v1"))
    await wait_until(lambda: w.fake.count("GET", path) == 1, what="the upstream request")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    tag_file = w.store.root / w.route.namespace / "tags" / REPO / "_tags" / "v1"
    await wait_until(tag_file.exists, what="the fetch to finish")
    result = await w.manifest("v1")
    assert (result.cache, result.manifest.body) == ("HIT", body)
    assert w.fake.count("GET", path) == 1


async def test_stalled_transfer_is_resumed_after_the_read_timeout(world: MakeWorld) -> None:
    w = await world()
    stalled_upstream = Upstream(w.route, w.metrics, read_timeout=0.3)
    await stalled_upstream.start()
    try:
        data = os.urandom(MiB)
        digest = w.fake.add_blob(data)
        path = f"/v2/{REPO}/blobs/{digest}"
        never = asyncio.Event()

        async def stall_first(request: web.Request) -> web.StreamResponse:
            if w.fake.count("GET", path) == 1:
                return await stream_in_parts(request, [data[:1000], data[1000:]],
                                             gates=[None, never], content_length=len(data))
            return w.fake.blob_response(request, digest)

        w.fake.override("GET", path, stall_first)
        flight, _ = w.cache.blobs.fetch(stalled_upstream, w.route, REPO, parse_digest(digest))
        assert await asyncio.wait_for(read_all(flight), 10) == data
        await w.settled(digest)
        assert [s.headers.get("Range") for s in w.fake.seen("GET", path)] == [
            FIRST_RANGE, "bytes=1000-"]
        assert blob_path(w, digest).read_bytes() == data
    finally:
        await stalled_upstream.close()


# -- stale-while-revalidate ---------------------------------------------------------------


async def test_stale_while_revalidate_answers_before_the_head_and_learns_the_change(
        world: MakeWorld) -> None:
    w = await world(tag_ttl=60, stale_while_revalidate=600)
    old, new = image_manifest(b"old"), image_manifest(b"new")
    w.fake.add_manifest(REPO, old, tag="v1")
    path = f"/v2/{REPO}/manifests/v1"
    assert (await w.manifest("v1")).cache == "MISS"
    w.fake.add_manifest(REPO, new, tag="v1")  # re-pointed upstream
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return w.fake.manifest_response(request, REPO, "v1")

    w.fake.override("HEAD", path, held)
    w.clock.advance(61)
    # Every client past the TTL is answered at once from cache, while one HEAD is held.
    answers = await asyncio.wait_for(asyncio.gather(*(w.manifest("v1") for _ in range(5))), 5)
    assert {(a.cache, a.manifest.body) for a in answers} == {("STALE", old)}
    await wait_until(lambda: w.fake.count("HEAD", path) == 1, what="the background HEAD")
    assert w.fake.count("GET", path) == 1
    assert w.metric("gateway_cache_requests_total", kind="tag", result="stale") == 5
    assert w.metric("gateway_stale_served_total") == 0, "no upstream failure was involved"
    gate.set()
    await wait_until(lambda: w.metric("gateway_tag_revalidations_total", result="changed") == 1,
                     what="the revalidation to finish")
    after = await w.manifest("v1")
    assert (after.cache, after.manifest.body) == ("HIT", new)
    assert w.fake.count("HEAD", path) == 1 and w.fake.count("GET", path) == 2


async def test_stale_while_revalidate_unchanged_and_failed(world: MakeWorld) -> None:
    w = await world(tag_ttl=60, stale_while_revalidate=600)
    body = image_manifest(b"same")
    w.fake.add_manifest(REPO, body, tag="v1")
    path = f"/v2/{REPO}/manifests/v1"
    await w.manifest("v1")
    w.clock.advance(61)
    assert (await w.manifest("v1")).cache == "STALE"
    await wait_until(lambda: w.metric("gateway_tag_revalidations_total",
                                      result="unchanged") == 1, what="the revalidation")
    assert (await w.manifest("v1")).cache == "HIT"  # confirmed: fresh again
    w.fake.respond("HEAD", path, 503)
    w.clock.advance(61)
    assert (await w.manifest("v1")).cache == "STALE"
    await wait_until(lambda: w.metric("gateway_tag_revalidations_total", result="failed") == 1,
                     what="the failed revalidation")
    assert w.fake.count("GET", path) == 1


async def test_past_the_window_the_tag_is_revalidated_in_the_foreground(
        world: MakeWorld) -> None:
    w = await world(tag_ttl=60, stale_while_revalidate=30)
    old, new = image_manifest(b"old"), image_manifest(b"new")
    w.fake.add_manifest(REPO, old, tag="v1")
    await w.manifest("v1")
    w.fake.add_manifest(REPO, new, tag="v1")
    w.clock.advance(91)
    result = await w.manifest("v1")
    assert (result.cache, result.manifest.body) == ("MISS", new)
    assert w.metric("gateway_tag_revalidations_total", result="changed") == 0


async def test_a_background_revalidation_is_cancelled_at_close(world: MakeWorld) -> None:
    w = await world(tag_ttl=60, stale_while_revalidate=600)
    w.fake.add_manifest(REPO, image_manifest(b"v1"), tag="v1")
    path = f"/v2/{REPO}/manifests/v1"
    await w.manifest("v1")
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()
        raise AssertionError("unreachable")

    w.fake.override("HEAD", path, hang)
    w.clock.advance(61)
    assert (await w.manifest("v1")).cache == "STALE"
    await wait_until(lambda: w.fake.count("HEAD", path) == 1, what="the background HEAD")
    assert len(w.cache.manifests.revalidating) == 1
    await asyncio.wait_for(w.cache.close(), 5)
    assert len(w.cache.manifests.revalidating) == 0
