"""The size cap against real registries and real pulls (issue #9): many images sharing
base layers, three times the cap in all, pulled in random order. Sampled every 100 ms,
the data directory never holds more than the cap plus the largest blob in flight; the
images pulled last are still HITs; pinned images stay; evicted ones pull again. Every
tenth pull is skopeo's, so a real client pulls while eviction runs."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Gateway
from tests.support.images import Image, make_image, shared_images, unique_bytes
from tests.support.pulls import pull_image
from tests.support.skopeo import DirLayout, Skopeo
from tests.support.upstreams import Upstream, route_entry
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20
IMAGES = 50
CAP = 21 * MiB
BASE = 2 * MiB  # the largest blob: every image's first layer


class Sampler:
    """The data directory's size every 100 ms (the index's own files aside): the peak."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()

    def size(self) -> int:
        total = 0
        for directory, _, names in os.walk(self.root):
            for name in names:
                if name.startswith("index.sqlite"):
                    continue
                try:
                    total += os.stat(os.path.join(directory, name)).st_size
                except FileNotFoundError:
                    continue
        return total

    def run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.size())
            self.samples += 1

    @contextmanager
    def sampling(self) -> Iterator[Sampler]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)


async def metric(http: aiohttp.ClientSession, gateway: Gateway, name: str) -> float:
    async with http.get(f"{gateway.url()}/metrics") as resp:
        text = await resp.text()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == name)


def skopeo_pull(skopeo: Skopeo, gateway: Gateway, repository: str, image: Image,
                into: Path) -> None:
    """A real client's pull: skopeo copies the image and every digest is checked."""
    skopeo.copy(f"{gateway.address()}/{repository}:latest", f"dir:{into}")
    layout = DirLayout(into)
    assert layout.manifest() == image.manifest.data
    assert layout.blob_digests() == {b.digest: b.digest for b in image.blobs}


async def test_many_images_over_the_cap_stay_under_it(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    skopeo = Skopeo(tmp_path / "skopeo")
    upstream = start_upstream("docker.io")
    images = shared_images(IMAGES, seed=11)
    assert unique_bytes(images) > 2.8 * CAP
    for i, image in enumerate(images):
        upstream.push(f"cap/img-{i}", image)
    pinned = {name: upstream.push(f"pinned/{name}", make_image(layer_sizes=(MiB,), seed=i))
              for i, name in enumerate(("a", "b", "c"))}
    routes: dict[str, Any] = {
        "default_route": "docker.io",
        "cache": {"max_size": f"{CAP}", "min_free": 0, "lease": "0s"},
        "pins": ["docker.io/pinned/a:*", "docker.io/pinned/b", "docker.io/pinned/c:latest"],
        "routes": {"docker.io": route_entry(upstream)}}
    gateway = start_gateway(routes)
    base = gateway.url()
    for name in ("a", "b"):
        await pull_image(http, base, f"pinned/{name}", "latest", pinned[name])

    order = list(range(IMAGES))
    random.Random(5).shuffle(order)
    with Sampler(gateway.data_dir).sampling() as sampler:
        for n, i in enumerate(order):
            if n % 10 == 9:  # every tenth by skopeo, the rest by this test's own client
                await asyncio.to_thread(skopeo_pull, skopeo, gateway, f"cap/img-{i}",
                                        images[i], tmp_path / f"pull-{n}")
            else:
                await pull_image(http, base, f"cap/img-{i}", "latest", images[i])
        await asyncio.sleep(0.3)  # a few more samples while eviction settles
    assert sampler.samples > 10
    assert sampler.peak <= CAP + BASE + 256 * 1024, (
        f"the data directory reached {sampler.peak / MiB:.1f} MiB, over the "
        f"{CAP / MiB:.0f} MiB cap by more than a blob")
    assert await metric(http, gateway, "gateway_evicted_bytes_total") > CAP

    # The last pulled are still cached, whole.
    for i in order[-4:]:
        again = await pull_image(http, base, f"cap/img-{i}", "latest", images[i])
        assert set(again.cache.values()) == {"HIT"}, again.cache
    # Pinned images were never evicted; the one named by its tag was fetched at start.
    for name, image in pinned.items():
        kept = await pull_image(http, base, f"pinned/{name}", "latest", image)
        assert set(kept.cache.values()) == {"HIT"}, (name, kept.cache)
    # The first pulled was evicted, and pulls again correctly (pull_image checks bytes).
    first = await pull_image(http, base, f"cap/img-{order[0]}", "latest", images[order[0]])
    assert "MISS" in first.cache.values(), first.cache
    second = order[1]
    await asyncio.to_thread(skopeo_pull, skopeo, gateway, f"cap/img-{second}", images[second],
                            tmp_path / "again")


async def test_a_gateway_started_over_its_cap_evicts_at_once(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession) -> None:
    """Restarted with a lower cap (or over it after a crash), the cache comes down to the
    cap before any request wakes the evictor, not a minute later."""
    upstream = start_upstream("docker.io")
    images = [make_image(layer_sizes=(MiB, MiB), seed=40 + i) for i in range(6)]
    for i, image in enumerate(images):
        upstream.push(f"restart/img-{i}", image)
    routes: dict[str, Any] = {"default_route": "docker.io",
                              "cache": {"min_free": 0, "lease": "0s"},
                              "routes": {"docker.io": route_entry(upstream)}}
    first = start_gateway(routes)
    for i, image in enumerate(images):
        await pull_image(http, first.url(), f"restart/img-{i}", "latest", image)
    data_dir = first.data_dir
    first.stop()
    full = Sampler(data_dir).size()
    assert full > 12 * MiB

    routes["cache"]["max_size"] = f"{4 * MiB}"
    second = start_gateway(routes, extra_args=("--data-dir", str(data_dir)))
    # No request: only the evictor's first pass at start can bring it down.
    await wait_until(lambda: Sampler(data_dir).size() <= 4 * MiB, timeout=15,
                     what="the cache evicted down to its new cap after the restart")
    assert await metric(http, second, "gateway_evicted_bytes_total") >= full - 4 * MiB

    async def gauge_caught_up() -> bool:  # the gauge shows the cache after the pass
        return await metric(http, second, "gateway_cache_bytes") <= 4 * MiB
    await wait_until(gauge_caught_up, timeout=5, what="gateway_cache_bytes under the cap")
    latest = len(images) - 1  # the image pulled last is the one kept
    again = await pull_image(http, second.url(), f"restart/img-{latest}", "latest",
                             images[latest])
    assert set(again.cache.values()) == {"HIT"}, again.cache
