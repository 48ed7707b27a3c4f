"""Parallel ranged fetch (cache/ranged.py) against the scripted fake upstream: parts tile
the blob and each byte is asked for once; an upstream that ignores Range, or a small
blob, gets one stream; a broken part asks only for its tail; a corrupt part aborts every
reader and keeps nothing; readers (also of a Range) get the prefix in order; a CDN
redirect is followed once and asked again when it is refused.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re

import pytest
from aiohttp import web

from gateway.cache import FetchAborted, IntegrityError, ranged
from gateway.cache.ranged import Plan, layout
from tests.support.fake_registry import image_manifest
from tests.support.faults import Fault, corrupt, hang_up
from tests.support.request_log import Seen
from tests.support.wait import wait_until
from tests.unit.conftest import make_route
from tests.unit.test_cache import (  # noqa: F401  (world is a fixture)
    REPO,
    MakeWorld,
    blob_path,
    read_all,
    spool_files,
    world,
)

MiB = 1 << 20
PART = MiB
SIZE = 10 * MiB + 123  # eleven parts, the last one short (with parts of at most PART)
DEFAULT_MAX_PART = ranged.MAX_PART


@pytest.fixture(autouse=True)
def parts_of_one_part_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts no larger than the first (MAX_PART): more parts than connections, so the
    tests below see the sliding window, resumes and aborts on many parts."""
    monkeypatch.setattr(ranged, "MAX_PART", PART)


def plan(part_size: int, parts: int) -> Plan:
    return Plan(part_size, parts, open_part=None)  # type: ignore[arg-type]


_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def path_of(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def asked(gets: list[Seen]) -> list[tuple[int, int]]:
    """The [start, end) of each ranged GET, by offset."""
    spans = []
    for seen in gets:
        match = _RANGE.fullmatch(seen.range or "")
        assert match, seen
        spans.append((int(match[1]), int(match[2]) + 1))
    return sorted(spans)


def tiles(spans: list[tuple[int, int]], size: int) -> bool:
    return spans[0][0] == 0 and spans[-1][1] == size and all(
        a[1] == b[0] for a, b in itertools.pairwise(spans))


async def answer_part(request: web.Request, data: bytes, *, cut_after: int | None = None,
                      gate: asyncio.Event | None = None, hold_after: int = 0) -> web.StreamResponse:
    """A 206 for the request's Range; cut (FIN) after `cut_after` bytes, or held at `gate`
    after `hold_after` bytes."""
    match = _RANGE.fullmatch(request.headers["Range"])
    assert match
    start, end = int(match[1]), min(int(match[2]) + 1, len(data))
    resp = web.StreamResponse(status=206, headers={
        "Content-Type": "application/octet-stream",
        "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
    resp.content_length = end - start
    await resp.prepare(request)
    body = data[start:end]
    if cut_after is not None:
        await resp.write(body[:cut_after])
        await hang_up(request, reset=False)
    if gate is not None:
        await resp.write(body[:hold_after])
        await gate.wait()
        body = body[hold_after:]
    await resp.write(body)
    await resp.write_eof()
    return resp


@pytest.mark.parametrize(("max_part", "parts"), [(PART, 11), (DEFAULT_MAX_PART, 4)],
                         ids=["a-window-of-many-parts", "one-equal-part-per-connection"])
async def test_big_blob_comes_in_parts_that_tile_it(
        world: MakeWorld, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        max_part: int, parts: int) -> None:
    monkeypatch.setattr(ranged, "MAX_PART", max_part)
    w = await world(parallel_fetch_threshold=PART, parallel_fetch_parts=4)
    data = os.urandom(SIZE)
    digest = w.fake.add_blob(data)
    flight, _ = w.flight(digest)
    assert await read_all(flight) == data
    await w.settled(digest)
    assert blob_path(w, digest).read_bytes() == data
    gets = w.fake.blob_requests(digest=digest)
    assert len(gets) == parts and asked(gets) == layout(plan(PART, 4), SIZE), \
        [g.range for g in gets]
    assert tiles(asked(gets), SIZE)
    assert gets[0].range == f"bytes=0-{PART - 1}"  # the first part asked first
    assert w.metric("gateway_upstream_bytes_total") == SIZE
    assert w.metric("gateway_blob_transfers_total", mode="ranged") == 1
    assert w.metric("gateway_blob_parts_total") == parts
    assert w.metric("gateway_blob_part_resumes_total") == 0


def test_after_the_first_part_the_rest_comes_in_equal_parts_one_per_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranged, "MAX_PART", DEFAULT_MAX_PART)
    # 25 MiB over 6 connections: 4 MiB first, then five equal parts of 4.2 MiB.
    spans = layout(plan(4 * MiB, 6), 25 * MiB)
    assert spans[0] == (0, 4 * MiB) and len(spans) == 6 and tiles(spans, 25 * MiB)
    sizes = [end - start for start, end in spans[1:]]
    assert max(sizes) - min(sizes) < 5 and min(sizes) >= 4 * MiB
    # None smaller than the first: 6 MiB over 6 connections is 4 + 2, not 4 + 5 x 0.4.
    assert layout(plan(4 * MiB, 6), 6 * MiB) == [(0, 4 * MiB), (4 * MiB, 6 * MiB)]
    # None larger than MAX_PART: a 2 GiB blob still comes through a window of parts.
    big = layout(plan(16 * MiB, 6), 2 << 30)
    assert tiles(big, 2 << 30) and max(e - s for s, e in big) == DEFAULT_MAX_PART
    assert layout(plan(4 * MiB, 6), 3 * MiB) == [(0, 3 * MiB)]  # one answer holds it all


def test_declared_sizes_serve_only_a_route_whose_upstream_answered_in_parts() -> None:
    route = make_route("http://127.0.0.1:9")
    sizes = ranged.DeclaredSizes(entries=2)
    sizes.declare(route.namespace, [("sha256:a", 10), ("sha256:b", 20)])
    assert sizes.size(route, "sha256:a") is None  # not yet seen to honour Range
    sizes.seen(route.name, "single")
    assert sizes.size(route, "sha256:a") is None
    sizes.seen(route.name, "ranged")
    assert (sizes.size(route, "sha256:a"), sizes.size(route, "sha256:b")) == (10, 20)
    sizes.declare(route.namespace, [("sha256:c", 30)])  # bounded: the oldest goes
    assert sizes.size(route, "sha256:a") is None and sizes.size(route, "sha256:c") == 30


@pytest.mark.parametrize("declared", ["right", "wrong"])
async def test_a_blob_its_manifest_declared_asks_for_every_part_at_once(
        world: MakeWorld, monkeypatch: pytest.MonkeyPatch, declared: str) -> None:  # noqa: F811
    """A manifest fetched upstream says how big its layers are: a cold layer's parts are
    laid out by it and all asked for before the first answer is back (a round trip
    sooner). A size that proves wrong stops the early parts; the answer decides."""
    monkeypatch.setattr(ranged, "MAX_PART", DEFAULT_MAX_PART)
    w = await world(parallel_fetch_threshold=PART, parallel_fetch_parts=4)
    # Early parts only from an upstream seen to honour Range (one that ignores it would
    # send each of them the whole blob): a first cold blob in parts shows it.
    first = w.fake.add_blob(os.urandom(2 * PART))
    assert len(await read_all(w.flight(first)[0])) == 2 * PART
    data = os.urandom(SIZE)
    digest = w.fake.add_blob(data)
    manifest = json.loads(image_manifest(data))
    manifest["layers"][0]["size"] = SIZE if declared == "right" else SIZE + 3 * MiB
    body = json.dumps(manifest).encode()
    w.fake.add_manifest(REPO, body, tag="v1")
    await w.manifest("v1")  # fetched upstream: its sizes are told to the blobs
    first_held = asyncio.Event()

    async def held_first(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Range", "").startswith("bytes=0-"):
            await first_held.wait()  # the first answer waits for the other parts' requests
        return await answer_part(request, data)

    w.fake.override("GET", path_of(digest), held_first)
    flight, _ = w.flight(digest)
    if declared == "right":
        await wait_until(lambda: len(w.fake.blob_requests(digest=digest)) == 4,
                         what="every part asked for before the first answer")
        first_held.set()
        assert await read_all(flight) == data
        gets = w.fake.blob_requests(digest=digest)
        spans = asked(gets)
        assert len(gets) == 4 and tiles(spans, SIZE), spans
        assert max(e - s for s, e in spans) - min(e - s for s, e in spans) < 4  # equal
        assert w.metric("gateway_upstream_bytes_total") == 2 * PART + len(body) + SIZE  # once
    else:
        await wait_until(lambda: len(w.fake.blob_requests(digest=digest)) >= 2,
                         what="the early parts asked for")
        first_held.set()
        assert await read_all(flight) == data  # laid out again by the first answer's size
    await w.settled(digest)
    assert flight.error is None and blob_path(w, digest).read_bytes() == data


@pytest.mark.parametrize("honour_range", [True, False], ids=["small-blob", "ignores-range"])
async def test_small_blob_or_range_ignoring_upstream_gets_one_stream(
        world: MakeWorld, honour_range: bool) -> None:  # noqa: F811
    w = await world(parallel_fetch_threshold=PART, parallel_fetch_parts=4)
    w.fake.honour_range = honour_range
    data = os.urandom(PART - 7 if honour_range else SIZE)
    digest = w.fake.add_blob(data)
    flight, _ = w.flight(digest)
    assert await read_all(flight) == data
    await w.settled(digest)
    assert blob_path(w, digest).read_bytes() == data
    gets = w.fake.blob_requests(digest=digest)
    assert [(g.range, g.status) for g in gets] == [
        (f"bytes=0-{PART - 1}", 206 if honour_range else 200)]
    assert w.metric("gateway_upstream_bytes_total") == len(data)
    assert w.metric("gateway_blob_transfers_total", mode="single") == 1
    assert w.metric("gateway_blob_transfers_total", mode="ranged") == 0


async def test_a_broken_part_asks_only_for_its_tail(world: MakeWorld) -> None:  # noqa: F811
    w = await world(parallel_fetch_threshold=PART, parallel_fetch_parts=4)
    data = os.urandom(SIZE)
    digest = w.fake.add_blob(data)
    broken = f"bytes={3 * PART}-{4 * PART - 1}"
    cut = 300_000

    async def handler(request: web.Request) -> web.StreamResponse:
        first = sum(g.range == broken for g in w.fake.blob_requests(digest=digest)) == 1
        if request.headers.get("Range") == broken and first:
            return await answer_part(request, data, cut_after=cut)
        return w.fake.blob_response(request, digest)

    w.fake.override("GET", path_of(digest), handler)
    flight, _ = w.flight(digest)
    assert await read_all(flight) == data
    await w.settled(digest)
    assert blob_path(w, digest).read_bytes() == data
    ranges = [g.range for g in w.fake.blob_requests(digest=digest)]
    assert len(ranges) == 12 and ranges.count(broken) == 1, ranges
    tail = [r for r in ranges if r is not None and r.endswith(f"-{4 * PART - 1}")
            and r != broken]
    assert tail == [f"bytes={3 * PART + cut}-{4 * PART - 1}"], ranges
    assert w.metric("gateway_upstream_bytes_total") == SIZE  # nothing fetched twice
    assert w.metric("gateway_blob_part_resumes_total") == 1
    assert w.metric("gateway_upstream_resumed_transfers_total") == 1


async def test_a_corrupt_part_aborts_every_reader_and_keeps_nothing(
        world: MakeWorld) -> None:  # noqa: F811
    w = await world(parallel_fetch_threshold=PART, parallel_fetch_parts=4)
    data = os.urandom(SIZE)
    digest = w.fake.add_blob(data)
    bad = corrupt(data, 5 * PART + 99)
    wrong = f"bytes={5 * PART}-{6 * PART - 1}"

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Range") == wrong:
            return await answer_part(request, bad)
        return w.fake.blob_response(request, digest)

    w.fake.override("GET", path_of(digest), handler)
    flight, _ = w.flight(digest)
    readers = [asyncio.create_task(read_all(flight)),
               asyncio.create_task(read_all(flight, 7 * PART))]
    for reader in readers:
        with pytest.raises(FetchAborted):
            await reader
    await w.settled(digest)
    assert isinstance(flight.error, IntegrityError)
    assert not blob_path(w, digest).exists()
    assert spool_files(w) == []
    assert w.metric("gateway_integrity_failures_total", kind="blob") == 1


async def test_readers_get_the_prefix_in_order_also_a_range_in_flight(
        world: MakeWorld) -> None:  # noqa: F811
    w = await world(parallel_fetch_threshold=PART, parallel_fetch_parts=4)
    data = os.urandom(SIZE)
    digest = w.fake.add_blob(data)
    gate = asyncio.Event()
    first = f"bytes=0-{PART - 1}"

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Range") == first:  # the prefix waits; later parts don't
            return await answer_part(request, data, gate=gate, hold_after=4096)
        return w.fake.blob_response(request, digest)

    w.fake.override("GET", path_of(digest), handler)
    flight, _ = w.flight(digest)
    early = asyncio.create_task(read_all(flight))
    await wait_until(lambda: len(w.fake.blob_requests(digest=digest)) >= 4,
                     what="the later parts to be asked for")
    await asyncio.sleep(0.05)
    assert flight.written <= 4096, "bytes past the held prefix were released"
    ranged = asyncio.create_task(read_all(flight, 5 * PART + 7, 7 * PART + 3))
    late = asyncio.create_task(read_all(flight, 0))
    gate.set()
    assert await early == data
    assert await late == data
    assert await ranged == data[5 * PART + 7:7 * PART + 3]
    await w.settled(digest)
    assert blob_path(w, digest).read_bytes() == data
    assert tiles(asked(w.fake.blob_requests(digest=digest)), SIZE)


async def test_the_cdn_redirect_is_followed_once_and_asked_again_when_refused(
        world: MakeWorld) -> None:  # noqa: F811
    w = await world(parallel_fetch_threshold=PART, parallel_fetch_parts=4)
    w.fake.redirect_blobs_to = w.served.url
    data = os.urandom(SIZE)
    digest = w.fake.add_blob(data)
    cdn = f"/cdn/{digest}"
    # The first CDN GET (the first part, by the registry's redirect) is answered; the
    # next says the signed URL expired: that part asks the registry again.
    w.fake.queue("GET", cdn, Fault(), Fault(status=403))
    flight, _ = w.flight(digest)
    assert await read_all(flight) == data
    await w.settled(digest)
    assert blob_path(w, digest).read_bytes() == data
    assert w.fake.count("GET", path_of(digest)) == 2
    served = [g for g in w.fake.seen("GET", cdn) if g.status == 206]
    assert len(served) == 11 and tiles(asked(served), SIZE)


async def test_an_empty_blob_is_asked_for_again_without_range(
        world: MakeWorld) -> None:  # noqa: F811
    w = await world(parallel_fetch_threshold=PART, parallel_fetch_parts=4)
    digest = w.fake.add_blob(b"")
    flight, _ = w.flight(digest)
    assert await read_all(flight) == b""
    await w.settled(digest)
    assert blob_path(w, digest).read_bytes() == b""
    assert [(g.range, g.status) for g in w.fake.blob_requests(digest=digest)] == [
        (f"bytes=0-{PART - 1}", 416), (None, 200)]
