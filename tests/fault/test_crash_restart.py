"""`kill -9` in the middle of fetches and eviction, then a restart on the same data
directory (issue #9): nothing corrupt is stored, the index matches the disk, the dead
process's spool is gone, and what was cached pulls again as HITs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.datadir import blob_path
from tests.support.gateway import Gateway
from tests.support.images import Image, shared_images
from tests.support.pulls import pull_image
from tests.support.upstreams import Upstream, route_entry
from tests.support.wait import wait_until

pytestmark = pytest.mark.fault

MiB = 1 << 20
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def cache_command(gateway: Gateway, data_dir: Path,
                  *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "cache", *args, "--routes",
         str(gateway.routes_path), "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=REPOSITORY_ROOT, timeout=120)


def stored_bytes(data_dir: Path) -> int:
    """Bytes of every committed blob and manifest file (what the index must account for)."""
    total = 0
    for namespace in data_dir.iterdir():
        if namespace.name.startswith(".") or not namespace.is_dir():
            continue
        for kind in ("blobs", "manifests"):
            for directory, _, names in os.walk(namespace / kind):
                total += sum(os.stat(os.path.join(directory, n)).st_size for n in names)
    return total


def fully_cached(data_dir: Path, image: Image) -> bool:
    return all(blob_path(data_dir, "docker.io", b.digest).exists() for b in image.blobs)


async def test_kill_9_mid_fetch_and_eviction_then_restart(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession) -> None:
    upstream = start_upstream("docker.io")
    images = shared_images(12, seed=31)
    for i, image in enumerate(images):
        upstream.push(f"crash/img-{i}", image)
    routes: dict[str, Any] = {
        "default_route": "docker.io",
        "cache": {"max_size": f"{8 * MiB}", "min_free": 0, "lease": "0s"},
        "routes": {"docker.io": route_entry(upstream)}}
    first = start_gateway(routes)
    for i, image in enumerate(images):  # 17 MiB through an 8 MiB cap: eviction runs
        await pull_image(http, first.url(), f"crash/img-{i}", "latest", image)
    (dead_spool,) = (p for p in (first.data_dir / ".spool").iterdir() if p.is_dir())

    # Fetches of evicted images in flight, slowly, when the process is killed.
    upstream.proxy.throttle_bytes_per_second = 256 * 1024
    sent = upstream.proxy.blob_bytes()
    pulls = [asyncio.create_task(pull_image(http, first.url(), f"crash/img-{i}", "latest",
                                            images[i])) for i in range(3)]
    await wait_until(lambda: upstream.proxy.blob_bytes() > sent + 300 * 1024,
                     what="blob bytes in flight")
    assert first.process is not None
    first.process.kill()
    first.process.wait()
    await asyncio.gather(*pulls, return_exceptions=True)
    upstream.proxy.throttle_bytes_per_second = None

    data_dir = first.data_dir
    second = start_gateway(routes, extra_args=("--data-dir", str(data_dir)))
    assert not dead_spool.exists(), "the killed process's spool was left behind"
    verify = cache_command(second, data_dir, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    async def index_matches_disk() -> bool:
        du = cache_command(second, data_dir, "du", "--json")
        assert du.returncode == 0, du.stderr
        return bool(json.loads(du.stdout)["bytes"] == stored_bytes(data_dir))

    await wait_until(index_matches_disk, what="the index to match the files on disk",
                     timeout=60)
    cached = [i for i, image in enumerate(images) if fully_cached(data_dir, image)]
    assert len(cached) >= 2, cached
    for i in cached:
        again = await pull_image(http, second.url(), f"crash/img-{i}", "latest", images[i])
        blobs = {d: c for d, c in again.cache.items() if not d.startswith("manifest:")}
        assert set(blobs.values()) == {"HIT"}, (i, again.cache)
