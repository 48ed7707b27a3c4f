"""Two gateway processes on one data directory (issue #8): starting the second while
the first is mid-transfer must not break the first one's transfer. Each process has
its own spool directory and sweeps only what dead processes left behind."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Gateway
from tests.support.images import sha256_digest
from tests.support.transfers import FIRST_RANGE
from tests.support.upstreams import Upstream, route_entry, unique_repository

pytestmark = pytest.mark.fault

SIZE = 24 << 20
THROTTLE = 6 << 20  # bytes/s at the upstream: the transfer lasts a few seconds


async def get_blob(http: aiohttp.ClientSession, gateway: Gateway, repository: str,
                   digest: str, first_bytes: asyncio.Event | None = None) -> tuple[str, str]:
    """(X-Cache, sha256 of the body) of a whole blob GET."""
    hasher = hashlib.sha256()
    async with http.get(f"{gateway.url()}/v2/{repository}/blobs/{digest}") as resp:
        assert resp.status == 200, resp.status
        async for chunk in resp.content.iter_chunked(1 << 16):
            hasher.update(chunk)
            if first_bytes is not None:
                first_bytes.set()
        return resp.headers["X-Cache"], "sha256:" + hasher.hexdigest()


async def fetches_in_flight(http: aiohttp.ClientSession, gateway: Gateway) -> float:
    async with http.get(f"{gateway.url()}/metrics") as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "gateway_inflight_fetches")


def spool_dirs(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / ".spool").iterdir() if p.is_dir()}


async def test_a_second_process_on_the_same_data_dir_keeps_the_first_ones_transfer(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("shared")
    data = random.Random(8).randbytes(SIZE)
    digest = sha256_digest(data)
    upstream.registry.client().push_blob(repository, data, digest)
    routes: dict[str, Any] = {"default_route": "docker.io",
                              "routes": {"docker.io": route_entry(upstream)}}
    first = start_gateway(routes)
    upstream.proxy.throttle_bytes_per_second = THROTTLE

    async with aiohttp.ClientSession(trust_env=False) as http:
        started = asyncio.Event()
        leader = asyncio.create_task(get_blob(http, first, repository, digest, started))
        await asyncio.wait_for(started.wait(), 60)
        (first_spool,) = spool_dirs(first.data_dir)
        # The second process starts (and sweeps) while the first one is mid-transfer.
        second = await asyncio.to_thread(
            start_gateway, routes, extra_args=("--data-dir", str(first.data_dir)))
        assert first_spool in spool_dirs(first.data_dir), "the live spool was swept"
        assert upstream.proxy.blob_bytes(repository) < SIZE, "the transfer ended too soon"
        # A client joining the first process's transfer now follows it from its spool.
        follower = asyncio.create_task(get_blob(http, first, repository, digest))
        assert await leader == ("MISS", digest)
        assert await follower == ("COALESCED", digest)
        upstream.proxy.throttle_bytes_per_second = None
        for _ in range(600):  # clients have the verified bytes before the rename
            if not await fetches_in_flight(http, first):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the blob was never committed")
        # Committed once into the shared store: both processes answer from it.
        assert await get_blob(http, first, repository, digest) == ("HIT", digest)
        assert await get_blob(http, second, repository, digest) == ("HIT", digest)
    blob_gets = [s for s in upstream.proxy.blob_requests(repository) if s.path.endswith(digest)]
    # One transfer: its parallel Range parts (FIRST_RANGE's size each), each asked once.
    part = int(FIRST_RANGE.rpartition("-")[2]) + 1
    assert sorted(s.range or "" for s in blob_gets) == sorted(
        f"bytes={start}-{min(start + part, SIZE) - 1}" for start in range(0, SIZE, part)), (
        "the blob left the upstream more than once")
    assert upstream.proxy.blob_bytes(repository) == SIZE
    first.stop()
    second.stop()
    assert spool_dirs(first.data_dir) == set(), "a stopped process leaves its spool behind"
