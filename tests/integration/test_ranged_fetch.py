"""Parallel ranged fetch against a real docker-registry behind a proxy that paces each
connection and all of them together, as a CDN and the link behind it do (issue #11):
a cold big blob arrives verified, each byte sent by the upstream once, its parts fetched
concurrently. Judged by bytes and the proxy's request log, never by a clock.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Gateway
from tests.support.images import sha256_digest
from tests.support.request_log import Seen
from tests.support.transfers import stream_get
from tests.support.upstreams import Upstream, unique_repository
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 200_000_000  # the "cold 200 MB blob"
PART = 8 * MiB
PARTS = 8
PER_CONNECTION = 8_000_000  # bytes per second, as the acceptance test says
TOTAL = 64_000_000
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


async def metric(session: aiohttp.ClientSession, gateway: Gateway, name: str,
                 **labels: str) -> float:
    async with session.get(f"{gateway.url()}/metrics") as resp:
        text = await resp.text()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def spans(gets: list[Seen]) -> list[tuple[int, int]]:
    """The [start, end) each ranged GET asked for, in order of offset."""
    found = []
    for seen in gets:
        match = _RANGE.fullmatch(seen.range or "")
        assert match, f"a part without a closed Range: {seen}"
        found.append((int(match[1]), int(match[2]) + 1))
    return sorted(found)


def overlapping(gets: list[Seen]) -> int:
    """How many pairs of requests were in flight at the same time."""
    pairs = 0
    for i, a in enumerate(gets):
        for b in gets[i + 1:]:
            assert a.ended is not None and b.ended is not None
            if a.started < b.ended and b.started < a.ended:
                pairs += 1
    return pairs


async def test_cold_big_blob_comes_in_concurrent_parts_each_byte_once(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
) -> None:
    upstream = start_upstream("ghcr.io")
    upstream.proxy.throttle_bytes_per_second = PER_CONNECTION
    upstream.proxy.total_bytes_per_second = TOTAL
    repository = unique_repository()
    data = os.urandom(SIZE)
    digest = sha256_digest(data)
    upstream.registry.client().push_blob(repository, data, digest)
    route: dict[str, Any] = {"upstream": upstream.url, "parallel_fetch_threshold": PART,
                             "parallel_fetch_parts": PARTS}
    gateway = start_gateway({"default_route": None, "routes": {"ghcr.io": route}})
    url = f"{gateway.url()}/v2/ghcr.io/{repository}/blobs/{digest}"

    async with aiohttp.ClientSession() as session:
        got = await stream_get(session, url)
        assert got.status == 200 and got.error is None, got
        assert got.received == SIZE and got.digest == digest
        assert got.cache == "MISS"

        # The proxy marks a part ended after its write_eof returns, which may be a moment
        # after the gateway has the bytes.
        await wait_until(lambda: all(g.ended is not None for g in upstream.proxy.blob_requests(
            repository, digest=digest)), what="every part's answer ended at the proxy",
            timeout=10)
        gets = upstream.proxy.blob_requests(repository, digest=digest)
        # Each byte came once: the parts tile the blob, no gap, no overlap, nothing more.
        assert sum(g.body_bytes for g in gets) == SIZE
        assert all(g.status == 206 for g in gets), gets
        tiles = spans(gets)
        assert tiles[0][0] == 0 and tiles[-1][1] == SIZE
        assert all(a[1] == b[0] for a, b in itertools.pairwise(tiles)), tiles
        # The first PART, then the rest in equal parts, one per other connection.
        assert len(gets) == PARTS and tiles[0] == (0, PART), tiles
        assert max(b - a for a, b in tiles[1:]) - min(b - a for a, b in tiles[1:]) < PARTS
        # Concurrently: with 8 at a time, many pairs of parts were in flight together.
        assert overlapping(gets) >= len(gets), "the parts were fetched one after another"

        assert await metric(session, gateway, "gateway_blob_transfers_total", mode="ranged") == 1
        assert await metric(session, gateway, "gateway_blob_parts_total") == len(gets)
        assert await metric(session, gateway, "gateway_upstream_bytes_total") == SIZE

        again = await stream_get(session, url)
        assert again.cache in ("HIT", "COALESCED") and again.digest == digest
        assert len(upstream.proxy.blob_requests(repository, digest=digest)) == len(gets)
