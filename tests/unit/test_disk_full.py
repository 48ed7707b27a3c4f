"""Disk full (ENOSPC, EDQUOT) in cache/: the make_room hook and its one retry, readers that
go on from the upstream when the spool cannot grow, relays that verify the whole blob and
never end a corrupt one cleanly, the relay window, manifests served though not kept.

The real `Cache` over an `FsStore` in tmp_path and a real `Upstream` to the scripted fake
registry. The disk is the only thing simulated: the flight's view of `os` has room for a
given number of bytes (a write past it writes what fits, then fails as a full filesystem
does), and a store whose rename or put fails with ENOSPC.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.cache import (
    BlobFlight,
    Cache,
    FetchAborted,
    FsStore,
    NoSpace,
    Relay,
)
from gateway.cache import flight as flight_module
from gateway.config import Route
from gateway.metrics import Metrics
from gateway.reference import Reference, parse_digest
from gateway.upstream import Upstream
from tests.support.clock import Clock
from tests.support.fake_registry import FakeRegistry, image_manifest, stream_in_parts
from tests.support.faults import Fault
from tests.support.images import sha256_digest as digest_of
from tests.support.request_log import resumes
from tests.support.transfers import FIRST_RANGE
from tests.support.wait import wait_until

from .conftest import Gateway, Served, make_cache, make_route

REPO = "owner/img"
MiB = 1 << 20


def no_space(code: int = errno.ENOSPC) -> OSError:
    return OSError(code, os.strerror(code))


class SmallDisk:
    """What the flight sees as `os`: room for `free` more bytes of writes; `fsync_fails`
    fsyncs and `open_fails` file creations fail with ENOSPC. Everything else is `os`."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.fsync_fails = 0
        self.open_fails = 0
        self.code = errno.ENOSPC
        self.fsynced: list[tuple[int, bool]] = []  # (inode, succeeded)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if self.free <= 0:
            raise no_space(self.code)
        written = os.pwrite(fd, data[:self.free], offset)
        self.free -= written
        return written

    def fsync(self, fd: int) -> None:
        inode = os.fstat(fd).st_ino
        if self.fsync_fails:
            self.fsync_fails -= 1
            self.fsynced.append((inode, False))
            raise no_space(self.code)
        os.fsync(fd)
        self.fsynced.append((inode, True))

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT and self.open_fails:
            self.open_fails -= 1
            raise no_space(self.code)
        return os.open(path, flags, mode)


class FullStore(FsStore):
    """An FsStore whose renames into the store (`adopt_fails` of them) and small writes
    (while `put_fails`) fail for want of space."""

    adopt_fails = 0
    put_fails = False

    async def adopt(self, key: str, file: Path) -> None:
        if self.adopt_fails:
            self.adopt_fails -= 1
            raise no_space()
        await super().adopt(key, file)

    async def put(self, key: str, data: bytes) -> None:
        if self.put_fails:
            raise no_space()
        await super().put(key, data)


@dataclass
class World:
    served: Served
    route: Route
    upstream: Upstream
    cache: Cache
    store: FullStore
    metrics: Metrics
    clock: Clock
    disk: SmallDisk
    asked: list[int] = field(default_factory=list)  # what make_room was asked for

    @property
    def fake(self) -> FakeRegistry:
        return self.served.fake

    def flight(self, digest: str) -> tuple[BlobFlight, bool]:
        return self.cache.blobs.fetch(self.upstream, self.route, REPO, parse_digest(digest))

    async def get(self, digest: str) -> Any:
        return await self.cache.blobs.get(self.upstream, self.route, REPO, parse_digest(digest))

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"route": self.route.name,
                                                              **labels})
        return 0.0 if value is None else value

    def make_room(self, frees: int | None, *, says: bool = True) -> None:
        """Install an evictor hook that frees `frees` bytes (None: what it is asked for)."""
        async def hook(bytes_needed: int) -> bool:
            self.asked.append(bytes_needed)
            self.disk.free += bytes_needed if frees is None else frees
            return says

        self.cache.disk.make_room = hook

    def blob_file(self, digest: str) -> Path:
        algorithm, hex_digest = digest.split(":")
        return self.store.root / self.route.namespace / "blobs" / algorithm / \
            hex_digest[:2] / hex_digest

    def kept(self, digest: str) -> bool:
        return self.blob_file(digest).exists()

    async def pull(self, digest: str) -> tuple[BlobFlight, bytes]:
        """Start (or join) the blob's fetch, read it whole, wait for the fetch to end."""
        flight, _ = self.flight(digest)
        got = bytearray()
        await follow(flight, got)
        await self.settled(digest)
        return flight, bytes(got)

    def spool_files(self) -> list[Path]:
        return [p for p in self.cache.spool.path.iterdir() if p.name != ".owner"]

    async def settled(self, digest: str) -> None:
        await wait_until(
            lambda: self.cache.blobs.inflight(self.route, parse_digest(digest)) is None,
            what="the fetch to end")


MakeWorld = Callable[..., Awaitable[World]]


@pytest.fixture
async def world(registry: Callable[..., Awaitable[Served]], tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeWorld]:
    caches: list[Cache] = []
    upstreams: list[Upstream] = []

    async def make(*, free: int = 1 << 40) -> World:
        served = await registry()
        route = make_route(served.url)
        metrics = Metrics()
        upstream = Upstream(route, metrics)
        await upstream.start()
        upstreams.append(upstream)
        clock = Clock()
        cache = make_cache(route, tmp_path / "data", metrics, clock, store_type=FullStore)
        store = cache.store
        assert isinstance(store, FullStore)
        await cache.open()
        caches.append(cache)
        disk = SmallDisk(free)
        monkeypatch.setattr(flight_module, "os", disk)
        return World(served, route, upstream, cache, store, metrics, clock, disk)

    yield make
    for cache in caches:
        await cache.close()
    for upstream in upstreams:
        await upstream.close()


async def follow(flight: BlobFlight, into: bytearray, start: int = 0,
                 end: int | None = None) -> None:
    await flight.wait_headers()
    async for chunk in flight.stream(start, end):
        into += chunk


async def read_relay(relay: Relay, into: bytearray, start: int = 0,
                     end: int | None = None) -> None:
    await relay.open()
    async for chunk in relay.stream(start, end):
        into += chunk


def gated_blob(fake: FakeRegistry, data: bytes, gate: asyncio.Event) -> str:
    """The first GET sends 1 MiB, then waits for `gate`; ranged GETs are answered at once."""
    digest = fake.add_blob(data)

    async def first_slow(request: web.Request) -> web.StreamResponse:
        if resumes(request.headers):
            return fake.blob_response(request, digest)
        return await stream_in_parts(request, [data[:MiB], data[MiB:]], gates=[None, gate],
                                     content_length=len(data))

    fake.override("GET", f"/v2/{REPO}/blobs/{digest}", first_slow)
    return digest


# ------------------------------------------------------------ the spool runs out of room


async def test_readers_of_a_spool_that_ran_out_of_room_get_the_rest_from_upstream(
        world: MakeWorld, caplog: pytest.LogCaptureFixture) -> None:
    w = await world(free=MiB + MiB // 2)
    data = os.urandom(4 * MiB)
    gate = asyncio.Event()
    digest = gated_blob(w.fake, data, gate)

    flight, _ = w.flight(digest)
    whole, ranged, tail = bytearray(), bytearray(), bytearray()
    readers = [asyncio.create_task(follow(flight, whole)),
               asyncio.create_task(follow(flight, ranged, 1000, 3 * MiB)),
               asyncio.create_task(follow(flight, tail, 3 * MiB))]
    await wait_until(lambda: len(whole) >= MiB - 1 and len(ranged) > 0,
                     what="the first MiB to reach the readers")
    gate.set()  # the next write finds the disk full
    await asyncio.gather(*readers)

    assert bytes(whole) == data
    assert bytes(ranged) == data[1000:3 * MiB]
    assert bytes(tail) == data[3 * MiB:]
    await w.settled(digest)
    assert isinstance(flight.lost, NoSpace) and isinstance(flight.error, NoSpace)
    assert not w.kept(digest) and w.spool_files() == []
    # A reader that was reading the spool asks for the rest from where the spool ended,
    # and reads the prefix back from its descriptor of the unlinked spool (the whole blob
    # is hashed). One that had not opened the spool yet is relayed from the start.
    assert MiB <= flight.written < MiB + MiB // 2
    ranges = [g.range for g in w.fake.blob_requests(digest=digest)]
    assert ranges[0] == FIRST_RANGE and len(ranges) == 4, ranges
    assert ranges.count(f"bytes={flight.written}-") >= 2, ranges
    assert set(ranges[1:]) <= {None, f"bytes={flight.written}-"}, ranges
    assert w.metric("gateway_disk_full_total", what="blob") == 1
    assert w.metric("gateway_disk_full_relays_total") == 3
    lines = [r.getMessage() for r in caplog.records if "disk full" in r.getMessage()]
    assert len(lines) == 1 and "ENOSPC" in lines[0] and digest in lines[0], lines


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
async def test_while_the_disk_is_full_new_gets_are_relayed_then_spooled_again(
        world: MakeWorld, code: int) -> None:
    w = await world(free=0)
    w.disk.code = code
    first, second = os.urandom(2 * MiB), os.urandom(3 * MiB)
    d1, d2 = w.fake.add_blob(first), w.fake.add_blob(second)

    got = bytearray()
    await follow(w.flight(d1)[0], got)  # ENOSPC at once: relayed from byte 0
    assert bytes(got) == first

    relay = await w.get(d2)  # no spool is even tried
    assert isinstance(relay, Relay)
    got = bytearray()
    await read_relay(relay, got)
    assert bytes(got) == second
    assert w.spool_files() == [] and not w.kept(d1) and not w.kept(d2)
    assert w.metric("gateway_disk_full_total", what="blob") == 1
    assert w.metric("gateway_cache_requests_total", kind="blob", result="miss") == 1

    # Room again, and the window is over: the next GET spools and keeps.
    w.disk.free = 1 << 40
    w.clock.advance(w.cache.disk.relay_seconds + 1)
    flight, started = await w.get(d2)
    assert started
    got = bytearray()
    await follow(flight, got)
    await w.settled(d2)
    assert bytes(got) == second and w.kept(d2)


async def test_the_relay_window_ends_when_the_evictor_says_so(world: MakeWorld) -> None:
    w = await world(free=0)
    digest = w.fake.add_blob(os.urandom(MiB))
    await follow(w.flight(digest)[0], bytearray())
    assert w.cache.disk.relaying()
    w.cache.disk.clear()
    assert not w.cache.disk.relaying()
    assert isinstance(await w.get(digest), tuple)


async def test_a_gets_range_while_relaying_is_verified_over_the_whole_blob(
        world: MakeWorld) -> None:
    w = await world(free=0)
    data = os.urandom(3 * MiB)
    digest = w.fake.add_blob(data)
    await follow(w.flight(digest)[0], bytearray())  # the disk is full: relays from now on

    relay = await w.get(digest)
    got = bytearray()
    await read_relay(relay, got, MiB, MiB + 10)
    assert bytes(got) == data[MiB:MiB + 10]
    assert w.fake.blob_requests(digest=digest)[-1].body_bytes == len(data)

    # The same range of a blob the upstream corrupts after it: never delivered whole.
    w.fake.always("GET", f"/v2/{REPO}/blobs/{digest}", Fault(corrupt_at=(2 * MiB,)))
    got = bytearray()
    with pytest.raises(FetchAborted):
        await read_relay(await w.get(digest), got, MiB, MiB + 10)
    assert len(got) < 10


# ------------------------------------------------------------ a corrupt relay never ends


@pytest.mark.parametrize("wrong", ["in-the-spooled-prefix", "in-the-relayed-rest", "last-byte"])
async def test_a_relay_with_corrupt_bytes_is_aborted_not_completed(
        world: MakeWorld, wrong: str) -> None:
    w = await world(free=MiB + MiB // 2)
    data = os.urandom(4 * MiB)
    gate = asyncio.Event()
    digest = gated_blob(w.fake, data, gate)
    path = f"/v2/{REPO}/blobs/{digest}"
    if wrong == "in-the-spooled-prefix":
        # The flight's own transfer is wrong early on; the disk fills before it could
        # tell. The relay must hash the prefix it read back from the spool.
        bad = bytearray(data)
        bad[100] ^= 0xFF
        w.fake.blobs[digest] = bytes(bad)
        w.fake.override("GET", path, _prefix_then_truth(w.fake, digest, bytes(bad), data, gate))
    else:
        offset = 3 * MiB if wrong == "in-the-relayed-rest" else len(data) - 1
        w.fake.queue("GET", path, _first_slow(data, gate))
        w.fake.always("GET", path, Fault(corrupt_at=(offset,)))

    flight, _ = w.flight(digest)
    got = bytearray()
    reader = asyncio.create_task(follow(flight, got))
    await wait_until(lambda: len(got) >= MiB - 1, what="the first MiB")
    gate.set()
    with pytest.raises(FetchAborted):
        await reader
    assert len(got) < len(data), "a corrupt relay reached its end"
    await w.settled(digest)
    assert not w.kept(digest) and w.spool_files() == []
    assert w.metric("gateway_integrity_failures_total", kind="blob") == 1


def _first_slow(data: bytes, gate: asyncio.Event) -> Callable[[web.Request],
                                                             Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:MiB], data[MiB:]], gates=[None, gate],
                                     content_length=len(data))
    return handler


def _prefix_then_truth(fake: FakeRegistry, digest: str, bad: bytes, good: bytes,
                       gate: asyncio.Event) -> Callable[[web.Request],
                                                        Awaitable[web.StreamResponse]]:
    """The first (whole) GET gets `bad`, slowly; ranged GETs the right bytes."""
    async def handler(request: web.Request) -> web.StreamResponse:
        if resumes(request.headers):
            fake.blobs[digest] = good
            return fake.blob_response(request, digest)
        return await stream_in_parts(request, [bad[:MiB], bad[MiB:]], gates=[None, gate],
                                     content_length=len(bad))
    return handler


async def test_a_relay_of_the_wrong_length_is_aborted(world: MakeWorld) -> None:
    w = await world(free=0)
    data = os.urandom(2 * MiB)
    digest = w.fake.add_blob(data)
    await follow(w.flight(digest)[0], bytearray())
    w.fake.blobs[digest] = data + b"more"  # the upstream now sends more than the digest's
    got = bytearray()
    relay = await w.get(digest)
    with pytest.raises(FetchAborted):
        await read_relay(relay, got)
    assert relay.size == len(data) + 4  # what the client is told: it never gets that many
    assert len(got) < relay.size
    assert w.metric("gateway_integrity_failures_total", kind="blob") == 1


# ------------------------------------------------------------ make_room and the one retry


async def test_room_made_by_the_evictor_lets_the_spool_go_on_and_keep_the_blob(
        world: MakeWorld) -> None:
    w = await world(free=MiB)
    w.make_room(None)
    data = os.urandom(4 * MiB)
    digest = w.fake.add_blob(data)
    flight, got = await w.pull(digest)
    assert got == data and w.kept(digest)
    assert flight.lost is None and flight.error is None
    # Asked once, for what was left to spool at the write that failed (within the
    # first MiB and a bit: the first read goes out before a whole chunk is gathered).
    assert len(w.asked) == 1 and 3 * MiB - 64 * 1024 <= w.asked[0] < len(data), w.asked
    assert len(w.fake.blob_requests(digest=digest)) == 1, "nothing relayed"
    assert w.metric("gateway_disk_full_total", what="blob") == 1
    assert not w.cache.disk.relaying()


@pytest.mark.parametrize("hook", ["frees-nothing", "says-no", "raises"])
async def test_when_no_room_can_be_made_the_readers_still_get_every_byte(
        world: MakeWorld, hook: str) -> None:
    w = await world(free=MiB)
    if hook == "frees-nothing":
        w.make_room(0)
    elif hook == "says-no":
        w.make_room(10 * MiB, says=False)  # freed, but says not: no retry
    else:
        async def broken(bytes_needed: int) -> bool:
            raise RuntimeError("evictor bug")
        w.cache.disk.make_room = broken
    data = os.urandom(3 * MiB)
    digest = w.fake.add_blob(data)
    flight, got = await w.pull(digest)
    assert got == data
    assert isinstance(flight.lost, NoSpace) and not w.kept(digest) and w.spool_files() == []
    assert len(w.asked) <= 1


async def test_a_failed_fsync_is_retried_on_a_fresh_copy_not_the_same_file(
        world: MakeWorld) -> None:
    w = await world()
    w.disk.fsync_fails = 1
    w.make_room(None)
    data = os.urandom(3 * MiB)
    digest = w.fake.add_blob(data)
    _, got = await w.pull(digest)
    assert got == data
    assert w.kept(digest) and w.spool_files() == []
    kept = w.blob_file(digest)
    assert digest_of(kept.read_bytes()) == digest
    assert w.asked == [len(data)]
    (failed, ok_failed), (durable, ok) = w.disk.fsynced
    assert not ok_failed and ok and durable != failed, "the same file was fsynced again"
    assert os.stat(kept).st_ino == durable


async def test_no_room_to_make_a_verified_blob_durable_loses_only_the_cache_copy(
        world: MakeWorld) -> None:
    w = await world()
    w.disk.fsync_fails = 1
    data = os.urandom(3 * MiB)
    digest = w.fake.add_blob(data)
    flight, got = await w.pull(digest)
    assert got == data
    assert flight.done and flight.error is None and isinstance(flight.lost, NoSpace)
    assert not w.kept(digest) and w.spool_files() == []
    assert w.cache.disk.relaying()
    # A reader that comes after the spool was removed is relayed, whole.
    got = bytearray()
    await follow(flight, got)
    assert bytes(got) == data


@pytest.mark.parametrize("room", [True, False], ids=["room-made", "no-room"])
async def test_a_rename_into_a_full_store(world: MakeWorld, room: bool) -> None:
    w = await world()
    w.store.adopt_fails = 1
    if room:
        w.make_room(None)
    data = os.urandom(2 * MiB)
    digest = w.fake.add_blob(data)
    _, got = await w.pull(digest)
    assert got == data
    assert w.kept(digest) is room
    assert w.spool_files() == []


async def test_no_room_for_even_the_spool_file_relays_from_the_start(world: MakeWorld) -> None:
    w = await world()
    w.disk.open_fails = 1
    data = os.urandom(2 * MiB)
    digest = w.fake.add_blob(data)
    flight, _ = w.flight(digest)
    with pytest.raises(NoSpace):
        await flight.wait_headers()
    got = bytearray()
    async for chunk in flight.stream():
        got += chunk
    assert bytes(got) == data
    relay = flight.relay()  # what the API serves such a reader
    got = bytearray()
    await read_relay(relay, got)
    assert bytes(got) == data


# ------------------------------------------------------------ manifests and tags


async def test_manifests_and_tags_that_cannot_be_written_are_served(world: MakeWorld) -> None:
    w = await world()
    w.store.put_fails = True
    body = image_manifest(b"layer")
    digest = w.fake.add_manifest(REPO, body, tag="v1")

    result = await w.cache.manifests.get(w.upstream, w.route, REPO, Reference.parse("v1"), None)
    assert result.manifest.body == body and result.manifest.digest == digest
    assert w.metric("gateway_disk_full_total", what="manifest") == 1
    assert w.metric("gateway_disk_full_total", what="tag") == 1
    # Not on disk, but remembered in memory: no second upstream GET.
    again = await w.cache.manifests.get(w.upstream, w.route, REPO, Reference.parse(digest),
                                        None)
    assert again.cache == "HIT" and again.manifest.body == body
    assert await w.store.get(f"{w.route.namespace}/manifests/sha256/{digest[7:9]}/"
                             f"{digest[7:]}") is None


# ------------------------------------------------------------ at the HTTP boundary


@pytest.fixture
def small_disk(monkeypatch: pytest.MonkeyPatch) -> SmallDisk:
    disk = SmallDisk(0)
    monkeypatch.setattr(flight_module, "os", disk)
    return disk


async def test_a_blob_get_on_a_full_disk_is_whole_and_verified_over_http(
        registry: Callable[..., Awaitable[Served]], gateway: Callable[..., Awaitable[Gateway]],
        small_disk: SmallDisk) -> None:
    served = await registry()
    gw = await gateway({"fake.test": {"upstream": served.url}}, default_route="fake.test")
    data = os.urandom(3 * MiB)
    digest = served.fake.add_blob(data)
    small_disk.open_fails = 1  # the first GET cannot even create its spool
    for _ in range(3):  # spool impossible, then relayed, then relayed
        resp = await gw.client.get(f"/v2/{REPO}/blobs/{digest}")
        assert resp.status == 200
        assert resp.content_length == len(data)
        assert await resp.read() == data
        assert resp.headers["X-Cache"] == "MISS"
    assert gw.sample("gateway_disk_full_total", route="fake.test", what="blob") == 1

    # A corrupt upstream: the client's body breaks instead of ending.
    served.fake.always("GET", f"/v2/{REPO}/blobs/{digest}", Fault(corrupt_at=(len(data) - 1,)))
    resp = await gw.client.get(f"/v2/{REPO}/blobs/{digest}")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
