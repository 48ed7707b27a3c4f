"""Eviction running hard while 16 clients pull continuously (issue #9): the working set
is several times the cap, so images are evicted and fetched again all the time. Not
one pull may fail: no error status, no digest mismatch, no "blob unknown", no empty
body (distribution's vacuum served 200s with empty bodies in exactly this race)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.gateway import Gateway
from tests.support.images import shared_images, unique_bytes
from tests.support.pulls import pull_image
from tests.support.upstreams import Upstream, route_entry

pytestmark = pytest.mark.fault

MiB = 1 << 20
CLIENTS = 16
SECONDS = 30.0  # the run is bounded by time and by count
MAX_PULLS = 5000
CAP = 8 * MiB


async def test_sixteen_clients_pull_without_a_failure_while_eviction_runs_hard(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    images = shared_images(20, seed=23)
    assert unique_bytes(images) > 3 * CAP
    for i, image in enumerate(images):
        upstream.push(f"load/img-{i}", image)
    routes: dict[str, Any] = {
        "default_route": "docker.io",
        # No lease: with 16 clients every image is served each second, and a lease would
        # (rightly) keep them all; here eviction must race the pulls.
        "cache": {"max_size": f"{CAP}", "min_free": 0, "lease": "0s"},
        "routes": {"docker.io": route_entry(upstream)}}
    gateway = start_gateway(routes)
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + SECONDS

    async def client(http: aiohttp.ClientSession, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline and sum(outcomes.values()) < MAX_PULLS:
            i = rng.randrange(len(images))
            try:
                pulled = await pull_image(http, gateway.url(), f"load/img-{i}", "latest",
                                          images[i])
            except (AssertionError, aiohttp.ClientError) as exc:
                failures.append(f"img-{i}: {exc}"[:300])
                continue
            outcomes.update(pulled.cache.values())

    async with aiohttp.ClientSession(trust_env=False) as http:
        await asyncio.gather(*(client(http, seed) for seed in range(CLIENTS)))
    assert failures == [], failures[:5]
    # Eviction really ran hard: blobs were fetched again, many times over.
    assert outcomes["MISS"] > 3 * len(images), outcomes
    assert outcomes["HIT"] > 0, outcomes
    fetched = upstream.proxy.blob_bytes()
    assert fetched > 2 * unique_bytes(images), fetched
