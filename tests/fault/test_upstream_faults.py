"""Blob transfers that the upstream breaks, corrupts or stalls, against the gateway as a
subprocess and an in-process fake upstream (issue #5).

- a connection cut mid-body is resumed with Range and the client gets a valid blob;
- bytes with the wrong digest never reach a client as a complete, successful body and
  leave nothing in the data directory;
- a Range request on a blob still in flight is answered from the partial file.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.datadir import blob_path, files_at_least, files_holding
from tests.support.fake_registry import FAKE_ROUTE as ROUTE
from tests.support.fake_registry import FakeRegistry, RunningFake, fake_routes
from tests.support.faults import Fault, corrupt
from tests.support.gateway import Gateway
from tests.support.images import sha256_digest
from tests.support.transfers import FIRST_RANGE, client_tasks, stream_get
from tests.support.wait import wait_until

pytestmark = pytest.mark.fault

SIZE = 3 << 20  # several of the gateway's 1 MiB chunks; one stream (below the parallel
# fetch threshold), small enough to be quick
REPOSITORY = "fault/blob"


def blob_url(gateway: Gateway, digest: str) -> str:
    return f"{gateway.url()}/v2/{REPOSITORY}/blobs/{digest}"


def upstream_path(digest: str) -> str:
    return f"/v2/{REPOSITORY}/blobs/{digest}"


@pytest.mark.parametrize(
    ("cuts", "honour_range"),
    [
        ((SIZE // 2,), True),
        ((SIZE // 2,), False),
        ((SIZE // 4, 3 * SIZE // 4), True),
    ],
    ids=["cut-once-206", "cut-once-upstream-ignores-range", "cut-twice-206"],
)
async def test_cut_transfer_is_resumed_with_range(
    fake_upstream: RunningFake, start_gateway: Callable[..., Gateway],
    cuts: tuple[int, ...], honour_range: bool,
) -> None:
    fake = fake_upstream.fake
    fake.honour_range = honour_range
    digest = fake.add_blob(os.urandom(SIZE))
    # The k-th GET is cut at the k-th offset (a FIN after flushing); the next is whole.
    fake.queue("GET", upstream_path(digest), *(Fault(cut_at=cut) for cut in cuts))
    gateway = start_gateway(fake_routes(fake_upstream.url))
    url = blob_url(gateway, digest)

    async with aiohttp.ClientSession() as session:
        got = await stream_get(session, url)
        assert got.status == 200, got
        assert got.error is None, f"the client's read failed: {got.error!r}"
        assert got.received == SIZE
        assert got.digest == digest, "the resumed blob has the wrong bytes"
        assert got.cache == "MISS"

        gets = fake.blob_requests(digest=digest)
        assert len(gets) == len(cuts) + 1, f"want one GET plus one per cut: {gets}"
        assert fake.pending() == []
        assert gets[0].range == FIRST_RANGE
        previous = 0
        for request, cut in zip(gets[1:], cuts, strict=True):
            match = re.fullmatch(r"bytes=(\d+)-", request.range or "")
            assert match, f"resume without an open-ended Range: {request}"
            offset = int(match.group(1))
            # Resumed from no further than what the broken response delivered, and not
            # from scratch: the bytes already received are not fetched again.
            assert previous < offset <= cut, (offset, cut)
            previous = offset

        # Verified bytes reach clients before the fsync and rename: wait for the commit.
        await wait_until(lambda: blob_path(gateway.data_dir, ROUTE, digest).exists(),
                         what="the resumed blob committed to the store")
        again = await stream_get(session, url)
        assert again.clean and again.digest == digest
        assert again.cache == "HIT", "the resumed blob was not kept"
        assert len(fake.blob_requests(digest=digest)) == len(cuts) + 1, "a HIT went upstream"


def _script(kind: str, fake: FakeRegistry, data: bytes) -> tuple[str, int]:
    """Serve `data` wrongly in the way `kind` says; return its digest and the offset of
    the byte that is wrong."""
    digest = fake.add_blob(data)
    path = upstream_path(digest)
    if kind == "same-length":
        wrong = SIZE // 3
        fake.always("GET", path, Fault(corrupt_at=(wrong,)))
    elif kind == "chunked-no-length":
        wrong = SIZE // 3
        fake.always("GET", path, Fault(corrupt_at=(wrong,), chunked=True))
    elif kind == "bad-bytes-after-resume":
        # The first response is right but cut; the resumed rest is corrupt.
        wrong = 3 * SIZE // 4
        fake.queue("GET", path, Fault(cut_at=SIZE // 2, corrupt_at=(wrong,)))
        fake.always("GET", path, Fault(corrupt_at=(wrong,)))
    elif kind == "last-byte-wrong":
        # Only the very end is wrong: the byte a streaming gateway must hold back.
        wrong = SIZE - 1
        fake.always("GET", path, Fault(corrupt_at=(wrong,)))
    else:
        raise AssertionError(kind)
    return digest, wrong


@pytest.mark.parametrize(
    "kind", ["same-length", "chunked-no-length", "bad-bytes-after-resume", "last-byte-wrong"])
async def test_wrong_bytes_are_never_served_complete_nor_kept(
    fake_upstream: RunningFake, start_gateway: Callable[..., Gateway], kind: str,
) -> None:
    fake = fake_upstream.fake
    data = os.urandom(SIZE)
    digest, wrong = _script(kind, fake, data)
    wrong_digest = sha256_digest(corrupt(data, wrong))
    assert wrong_digest != digest
    gateway = start_gateway(fake_routes(fake_upstream.url))
    url = blob_url(gateway, digest)

    async with aiohttp.ClientSession() as session:
        # Three clients at once: the one that starts the fetch and two that join it.
        results = await asyncio.gather(*(stream_get(session, url) for _ in range(3)))
        for got in results:
            complete = got.status == 200 and got.error is None and got.received == SIZE
            assert not complete, (
                f"a client saw a successful complete transfer of bad bytes: {got.status} "
                f"X-Cache {got.cache}, {got.received} bytes, digest {got.digest[:19]}")
            assert not got.clean, got
            if got.status == 200:
                assert got.error is not None or got.received < SIZE

        # Nothing of the transfer stays: not as the blob, not as a spool file.
        data_dir = gateway.data_dir
        await wait_until(lambda: not files_at_least(data_dir, SIZE // 2),
                         what="the data dir to drop the failed transfer",
                         diagnostics=lambda: str(files_at_least(data_dir, 1)))
        assert not blob_path(data_dir, ROUTE, digest).exists()
        assert not files_holding(data_dir, wrong_digest)

        # And the next request is not answered from cache.
        again = await stream_get(session, url)
        assert again.cache != "HIT", "a blob that failed verification was cached"
        assert not (again.status == 200 and again.error is None and again.received == SIZE)
    assert fake.blob_requests(digest=digest), "the fake was never asked"
    if kind == "bad-bytes-after-resume":
        assert fake.pending() == [], "the first response was never cut"


async def test_range_on_inflight_blob_is_answered_before_it_completes(
    fake_upstream: RunningFake, start_gateway: Callable[..., Gateway],
) -> None:
    fake = fake_upstream.fake
    size = 16 << 20
    gate = size // 2  # the upstream sends this much, then holds the rest back
    data = os.urandom(size)
    digest = fake.add_blob(data)
    fake.queue("GET", upstream_path(digest), Fault(stall_at=gate))
    # One stream, held at half (parts would fetch the second half meanwhile).
    gateway = start_gateway(fake_routes(fake_upstream.url, parallel_fetch_threshold="off"))
    url = blob_url(gateway, digest)

    async with aiohttp.ClientSession() as session, client_tasks() as spawn:
        whole = spawn(stream_get(session, url))  # starts the fetch
        await wait_until(lambda: fake.gate.reached, timeout=60,
                         what="the gateway to fetch the first half of the blob")

        # The upstream has sent exactly `gate` bytes and sends no more until released,
        # so whatever is answered now comes from the partial, in-flight file.
        start, last = 1000, gate // 2
        ranged: dict[str, Any] = {}

        async def ask() -> None:
            ranged["got"] = await stream_get(
                session, url, headers={"Range": f"bytes={start}-{last}"}, keep=True)

        try:
            await asyncio.wait_for(ask(), 30)
        except TimeoutError:
            pytest.fail("a Range request on an in-flight blob was not answered while the "
                        "upstream held back the rest of the blob")
        assert not fake.gate.is_open
        got = ranged["got"]
        assert got.status == 206, got
        assert got.error is None, got.error
        assert got.headers.get("Content-Range") == f"bytes {start}-{last}/{size}"
        assert got.body == data[start:last + 1], "the in-flight range has the wrong bytes"
        assert got.cache == "COALESCED"

        head = await session.head(url)
        assert head.status == 200 and head.content_length == size
        assert head.headers.get("X-Cache") == "COALESCED"
        head.release()

        # A range reaching past what has arrived is answered once the bytes are there.
        tail = spawn(stream_get(
            session, url, headers={"Range": f"bytes={gate - 10}-"}, keep=True))
        fake.release()
        first, rest = await whole, await tail
        assert first.clean and first.digest == digest and first.cache == "MISS"
        assert rest.status == 206 and rest.error is None
        assert rest.headers.get("Content-Range") == f"bytes {gate - 10}-{size - 1}/{size}"
        assert rest.body == data[gate - 10:]

    gets = fake.blob_requests(digest=digest)
    assert len(gets) == 1, f"Range requests went upstream: {gets}"
    assert fake.blob_bytes(digest=digest) == size
