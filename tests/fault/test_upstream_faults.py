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
from support.gateway import Gateway
from support.images import sha256_digest

from .support_fault import FAKE_ROUTE as ROUTE
from .support_fault import (
    BlobPlan,
    RunningFake,
    blob_path,
    client_tasks,
    corrupt,
    fake_routes,
    files_at_least,
    files_holding,
    poll,
    stream_get,
)

pytestmark = pytest.mark.fault

SIZE = 8 << 20  # several of the gateway's 1 MiB chunks, small enough to be quick
REPOSITORY = "fault/blob"


def blob_url(gateway: Gateway, digest: str) -> str:
    return f"{gateway.url()}/v2/{REPOSITORY}/blobs/{digest}"


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
    plan = fake.add(BlobPlan(os.urandom(SIZE), cuts=cuts, honour_range=honour_range))
    gateway = start_gateway(fake_routes(fake_upstream.url))
    url = blob_url(gateway, plan.digest)

    async with aiohttp.ClientSession() as session:
        got = await stream_get(session, url)
        assert got.status == 200, got
        assert got.error is None, f"the client's read failed: {got.error!r}"
        assert got.received == SIZE
        assert got.digest == plan.digest, "the resumed blob has the wrong bytes"
        assert got.cache == "MISS"

        gets = fake.blob_gets(plan.digest)
        assert len(gets) == len(cuts) + 1, f"want one GET plus one per cut: {gets}"
        assert gets[0].range is None
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
        await poll(lambda: blob_path(gateway.data_dir, ROUTE, plan.digest).exists(),
                   what="the resumed blob committed to the store")
        again = await stream_get(session, url)
        assert again.clean and again.digest == plan.digest
        assert again.cache == "HIT", "the resumed blob was not kept"
        assert len(fake.blob_gets(plan.digest)) == len(cuts) + 1, "a HIT went upstream"


def _plan(kind: str, data: bytes) -> BlobPlan:
    if kind == "same-length":
        return BlobPlan(data, served=corrupt(data, SIZE // 3))
    if kind == "chunked-no-length":
        return BlobPlan(data, served=corrupt(data, SIZE // 3), chunked=True)
    if kind == "bad-bytes-after-resume":
        # The first response is right but cut; the resumed rest is corrupt.
        return BlobPlan(data, served=corrupt(data, 3 * SIZE // 4), cuts=(SIZE // 2,))
    if kind == "last-byte-wrong":
        # Only the very end is wrong: the byte a streaming gateway must hold back.
        return BlobPlan(data, served=corrupt(data, SIZE - 1))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["same-length", "chunked-no-length", "bad-bytes-after-resume", "last-byte-wrong"])
async def test_wrong_bytes_are_never_served_complete_nor_kept(
    fake_upstream: RunningFake, start_gateway: Callable[..., Gateway], kind: str,
) -> None:
    fake = fake_upstream.fake
    plan = fake.add(_plan(kind, os.urandom(SIZE)))
    wrong_digest = sha256_digest(plan.body)
    assert wrong_digest != plan.digest
    gateway = start_gateway(fake_routes(fake_upstream.url))
    url = blob_url(gateway, plan.digest)

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
        await poll(lambda: not files_at_least(data_dir, SIZE // 2),
                   what=f"the data dir drops the failed transfer: {files_at_least(data_dir, 1)}")
        assert not blob_path(data_dir, ROUTE, plan.digest).exists()
        assert not files_holding(data_dir, wrong_digest)

        # And the next request is not answered from cache.
        again = await stream_get(session, url)
        assert again.cache != "HIT", "a blob that failed verification was cached"
        assert not (again.status == 200 and again.error is None and again.received == SIZE)
    assert fake.blob_gets(plan.digest), "the fake was never asked"


async def test_range_on_inflight_blob_is_answered_before_it_completes(
    fake_upstream: RunningFake, start_gateway: Callable[..., Gateway],
) -> None:
    fake = fake_upstream.fake
    size = 16 << 20
    gate = size // 2  # the upstream sends this much, then holds the rest back
    data = os.urandom(size)
    plan = fake.add(BlobPlan(data, gate_at=gate))
    gateway = start_gateway(fake_routes(fake_upstream.url))
    url = blob_url(gateway, plan.digest)

    async with aiohttp.ClientSession() as session, client_tasks() as spawn:
        whole = spawn(stream_get(session, url))  # starts the fetch
        reached = await asyncio.to_thread(fake.reached_gate.wait, 60)
        assert reached, "the gateway never fetched the first half of the blob"

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
        assert not fake.gate.is_set()
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
        assert first.clean and first.digest == plan.digest and first.cache == "MISS"
        assert rest.status == 206 and rest.error is None
        assert rest.headers.get("Content-Range") == f"bytes {gate - 10}-{size - 1}/{size}"
        assert rest.body == data[gate - 10:]

    gets = fake.blob_gets(plan.digest)
    assert len(gets) == 1, f"Range requests went upstream: {gets}"
