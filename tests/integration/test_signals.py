"""SIGHUP means "reload", never "stop": a gateway serving plain HTTP used to die on it
(the handler was installed only with TLS), failing most pulls of a running loop."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.gateway import Gateway
from tests.support.images import ACCEPT_ALL_MANIFESTS, Image, make_image
from tests.support.upstreams import Upstream, route_entry, unique_repository
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CLIENTS = 32
PULLS_PER_CLIENT = 15
HANGUPS = 5


async def pull(http: aiohttp.ClientSession, base: str, repository: str, image: Image) -> None:
    """One pull: the manifest by tag, then every blob, each checked against its digest."""
    async with http.get(f"{base}/v2/{repository}/manifests/latest",
                        headers={"Accept": ACCEPT_ALL_MANIFESTS}) as resp:
        assert resp.status == 200, resp.status
        assert await resp.read() == image.manifest.data
    for blob in image.blobs:
        async with http.get(f"{base}/v2/{repository}/blobs/{blob.digest}") as resp:
            assert resp.status == 200, resp.status
            assert "sha256:" + hashlib.sha256(await resp.read()).hexdigest() == blob.digest


async def test_sighup_under_a_pull_loop_never_ends_the_process(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("hup")
    image = upstream.push(repository, make_image(layer_sizes=(8192, 65536)))
    routes: dict[str, Any] = {"default_route": "docker.io",
                              "routes": {"docker.io": route_entry(upstream)}}
    gateway = start_gateway(routes)
    assert gateway.process is not None
    base = gateway.url()
    failures: list[BaseException] = []
    done = 0
    progressed = asyncio.Event()

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal done
        for _ in range(PULLS_PER_CLIENT):
            try:
                await pull(http, base, repository, image)
                done += 1
            except (AssertionError, aiohttp.ClientError) as exc:
                failures.append(exc)
            progressed.set()

    async def hang_up() -> None:
        # Spread over the loop by progress, not by time: each signal lands mid-run.
        assert gateway.process is not None
        total = CLIENTS * PULLS_PER_CLIENT
        for k in range(1, HANGUPS + 1):
            while done < k * total // (HANGUPS + 1) and not failures:
                progressed.clear()
                await progressed.wait()
            gateway.process.send_signal(signal.SIGHUP)

    async with aiohttp.ClientSession(trust_env=False) as http:
        await asyncio.gather(hang_up(), *(client(http) for _ in range(CLIENTS)))
        assert gateway.process.poll() is None, "SIGHUP ended the gateway"
        assert failures == [] and done == CLIENTS * PULLS_PER_CLIENT, failures[:3]
        await pull(http, base, repository, image)  # and it still serves afterwards
    wait_for(lambda: gateway.log().count('"SIGHUP') == HANGUPS, what="a log line per SIGHUP",
             diagnostics=gateway.log)
