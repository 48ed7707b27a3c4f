"""/readyz and the status JSON of a gateway process in front of a real upstream: ready
once serving, 503 naming only the failing check while its data directory refuses files
(as root too), ready again after; status.json agrees with /metrics after real pulls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Gateway
from tests.support.images import make_image
from tests.support.pulls import fetch, pull_image, wait_cached
from tests.support.unwritable import unwritable
from tests.support.upstreams import Upstream, unique_repository
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def _routes(*upstreams: Upstream) -> dict[str, Any]:
    return {"default_route": None,
            "routes": {u.route: {"upstream": u.url} for u in upstreams}}


async def _get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as answer:
        return answer.status, await answer.json(content_type=None)


async def test_readyz_follows_the_data_directory(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession) -> None:
    upstream = start_upstream("ghcr.io")
    gateway = start_gateway(_routes(upstream))
    base = gateway.url()
    assert await _get_json(http, f"{base}/readyz") == (200, {"ready": True})
    with unwritable(gateway.data_dir):
        async def unready() -> bool:
            return (await _get_json(http, f"{base}/readyz"))[0] == 503

        await wait_until(unready, what="/readyz to answer 503", timeout=10)
        status, body = await _get_json(http, f"{base}/readyz")
        assert (status, body) == (503, {"ready": False, "failing": ["data_dir"]})
        async with http.get(f"{base}/healthz") as alive:
            assert alive.status == 200  # alive all the same: a restart would not help
    async def ready() -> bool:
        return (await _get_json(http, f"{base}/readyz"))[0] == 200

    await wait_until(ready, what="/readyz to answer 200 again", timeout=10)
    log = gateway.logged("not ready: data_dir: data directory not writable (E")
    assert str(upstream.url) not in log.split("not ready:", 1)[1].splitlines()[0]


def _samples(text: str, route: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("route") != route:
                continue
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())
                                   if k in ("result", "reason"))
            found[key] = found.get(key, 0.0) + s.value
    return found


async def test_status_json_agrees_with_metrics_after_real_pulls(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession) -> None:
    ghcr, quay = start_upstream("ghcr.io"), start_upstream("quay.io")
    gateway = start_gateway(_routes(ghcr, quay))
    base = gateway.url()
    repositories = {}
    for upstream, pulls in ((ghcr, 3), (quay, 1)):
        repository = unique_repository()
        image = upstream.push(repository, make_image(layer_sizes=(100_000, 400_000)))
        name = f"{upstream.route}/{repository}"
        for _ in range(pulls):
            await pull_image(http, base, name, "latest", image)
            await wait_cached(http, base, name, image)
        repositories[upstream.route] = repository
    missing = await fetch(http, f"{base}/v2/quay.io/owner/not-there/manifests/v1")
    assert missing.status == 404
    await asyncio.sleep(0.1)  # the last answers' metrics are counted after they are sent

    status, document = await _get_json(http, f"{base}/_gateway/status.json")
    assert status == 200
    async with http.get(f"{base}/metrics") as answer:
        text = await answer.text()
    for route in document["routes"]:
        counted = _samples(text, route["name"])
        lookups = {r: round(counted.get(f"gateway_cache_requests_total,result={r}", 0))
                   for r in ("hit", "miss", "stale", "coalesced")}
        assert route["lookups"] == lookups
        assert route["hit_ratio"] == pytest.approx(lookups["hit"] / sum(lookups.values()))
        assert route["served_bytes"] == counted["gateway_served_bytes_total"]
        assert route["upstream_bytes"] == counted["gateway_upstream_bytes_total"]
        assert route["saved_bytes"] == max(route["served_bytes"] - route["upstream_bytes"], 0)
        assert route["requests"] == counted["gateway_requests_total"]
        assert route["upstream"]["requests"] == counted["gateway_upstream_requests_total"]
        assert route["upstream"]["latency"]["count"] == counted[
            "gateway_upstream_request_duration_seconds_count"]
        assert route["cache_bytes"] == counted.get("gateway_cache_bytes", 0)
    ghcr_status, quay_status = document["routes"]
    assert ghcr_status["lookups"]["hit"] > 0 and ghcr_status["saved_bytes"] > 900_000
    assert quay_status["upstream"]["last_error"]["reason"] == "http_404"
    assert quay_status["upstream"]["health"] == "ok"
    top = document["top_repositories"]
    assert top[0] == {"route": "ghcr.io", "repository": repositories["ghcr.io"],
                      "pulls": 6, "error": 0}  # by tag and by digest, three times
    assert {"route": "quay.io", "repository": repositories["quay.io"], "pulls": 2,
            "error": 0} in top
    assert document["transfers"] == [] and document["ready"]["ready"] is True
    assert document["cache"]["used_bytes"] == sum(r["cache_bytes"] for r in document["routes"])
