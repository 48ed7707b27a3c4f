"""The status page in a real browser (Debian's chromium, headless, over CDP): after a few
pulls through real upstreams it shows each route's hit ratio and bytes as /metrics
counts them, in English and in 简体中文 after the browser's language; a blob held in
flight at a throttled upstream shows with its progress and leaves once done; and the
page loads nothing from anywhere but the gateway. Screenshots are kept as artefacts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.browser import Page, chromium
from tests.support.faults import Fault, Gate
from tests.support.gateway import REPOSITORY_ROOT, Gateway
from tests.support.images import make_image
from tests.support.pulls import fetch, pull_image, wait_cached
from tests.support.upstreams import Upstream, unique_repository
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(os.environ.get("GATEWAY_ARTIFACTS", REPOSITORY_ROOT / "artifacts"))
BIG = 2_000_000  # the layer held in flight
HELD_AT = 1_200_000  # where the upstream stops sending it until the test says go


# -- the page's formatting rules (status.js: bytes(), percent()), to read its text -------


def _fixed(value: float, places: int) -> str:
    """JavaScript's Number.prototype.toFixed: the exact binary value, ties away from 0."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def shown_bytes(n: int) -> str:
    value, unit = float(n), 0
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{n} B"
    return f"{_fixed(value, 2 if value < 10 else 1 if value < 100 else 0)} {units[unit]}"


def shown_percent(ratio: float) -> str:
    return f"{_fixed(ratio * 100, 1)}%"


# -- what /metrics says ------------------------------------------------------------------


async def metric_totals(http: aiohttp.ClientSession, base: str, route: str) -> dict[str, Any]:
    async with http.get(f"{base}/metrics") as answer:
        text = await answer.text()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples
               if s.labels.get("route") == route]

    def total(name: str, **labels: str) -> int:
        return round(sum(s.value for s in samples if s.name == name
                         and all(s.labels.get(k) == v for k, v in labels.items())))

    lookups = {r: total("gateway_cache_requests_total", result=r)
               for r in ("hit", "miss", "stale", "coalesced")}
    served = total("gateway_served_bytes_total")
    fetched = total("gateway_upstream_bytes_total")
    return {"hit_ratio": lookups["hit"] / sum(lookups.values()), "lookups": lookups,
            "served_bytes": served, "upstream_bytes": fetched,
            "saved_bytes": max(served - fetched, 0)}


ROW_JS = """(() => {
  const out = {};
  for (const row of document.querySelectorAll('#routes tbody tr')) {
    const cells = {};
    for (const td of row.querySelectorAll('td[data-field]'))
      cells[td.dataset.field] = {value: td.dataset.value, text: td.textContent};
    out[row.dataset.route] = cells;
  }
  return out;
})()"""

TRANSFER_JS = """(() => [...document.querySelectorAll('#transfers tbody tr')].map(row => ({
  digest: row.dataset.digest, route: row.dataset.route,
  bytes: Number(row.querySelector('[data-field=progress]').dataset.value),
  size: Number(row.querySelector('[data-field=progress]').dataset.size),
  text: row.querySelector('[data-field=progress]').textContent,
  max: row.querySelector('progress').max, value: row.querySelector('progress').value})))()"""


async def rendered(page: Page) -> None:
    async def has_data() -> bool:
        return bool(await page.evaluate("document.body.dataset.generated !== undefined"))

    await wait_until(has_data, what="the page to render status.json")


async def next_render(page: Page) -> None:
    """Wait for the page's next poll (the data of a poll that began after this call)."""
    before = await page.evaluate("document.body.dataset.generated")

    async def moved() -> bool:
        return bool(await page.evaluate(f"document.body.dataset.generated !== '{before}'"))

    await wait_until(moved, what="the page to poll again", timeout=15)


def assert_route_agrees(shown: dict[str, Any], counted: dict[str, Any], route: str) -> None:
    cells = shown[route]
    assert cells["hit_ratio"]["text"] == shown_percent(counted["hit_ratio"]), route
    assert float(cells["hit_ratio"]["value"]) == pytest.approx(counted["hit_ratio"]), route
    lookups = counted["lookups"]
    assert cells["lookups"]["text"] == " / ".join(
        str(lookups[r]) for r in ("hit", "miss", "stale", "coalesced")), route
    for field in ("served_bytes", "upstream_bytes", "saved_bytes"):
        assert int(cells[field]["value"]) == counted[field], (route, field)
        assert cells[field]["text"] == shown_bytes(counted[field]), (route, field)


async def pull_twice(http: aiohttp.ClientSession, base: str, upstream: Upstream) -> None:
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=(200_000, 700_000)))
    name = f"{upstream.route}/{repository}"
    await pull_image(http, base, name, "latest", image)
    await wait_cached(http, base, name, image)
    await pull_image(http, base, name, "latest", image)


async def test_status_page_in_a_real_browser(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    ghcr, quay = start_upstream("ghcr.io"), start_upstream("quay.io")
    gateway = start_gateway({"default_route": None, "routes": {
        "ghcr.io": {"upstream": ghcr.url}, "quay.io": {"upstream": quay.url}}})
    base = gateway.url()
    await pull_twice(http, base, ghcr)
    await pull_twice(http, base, quay)
    once = unique_repository()
    await pull_image(http, base, f"quay.io/{once}", "latest",
                     quay.push(once, make_image(layer_sizes=(50_000,))))

    async with chromium(tmp_path / "chromium") as page:
        await page.open(f"{base}/_gateway/", accept_language="en-US,en;q=0.9")
        await rendered(page)
        shown = await page.evaluate(ROW_JS)
        for route in ("ghcr.io", "quay.io"):
            assert_route_agrees(shown, await metric_totals(http, base, route), route)
        assert await page.evaluate("document.documentElement.lang") == "en"
        assert "Hit ratio" in await page.evaluate("document.body.innerText")
        english = await page.screenshot(ARTIFACTS / "status-page-en.png")

        # A big layer whose upstream sends slowly, then holds it at HELD_AT.
        repository = unique_repository()
        image = quay.push(repository, make_image(layer_sizes=(BIG,)))
        layer = max(image.blobs, key=lambda b: b.size)
        gate = Gate()
        quay.proxy.queue("GET", f"/v2/{repository}/blobs/{layer.digest}",
                         Fault(throttle=600_000, stall_at=HELD_AT, gate=gate))
        pulling = asyncio.ensure_future(fetch(
            http, f"{base}/v2/quay.io/{repository}/blobs/{layer.digest}", accept=None))
        try:
            await page.open(f"{base}/_gateway/", accept_language="zh-CN,zh;q=0.9,en;q=0.5")
            await rendered(page)

            async def in_flight() -> bool:
                rows = await page.evaluate(TRANSFER_JS)
                return any(r["digest"] == layer.digest and r["bytes"] > 0 for r in rows)

            await wait_until(in_flight, what="the page to show the transfer in flight")
            (row,) = [r for r in await page.evaluate(TRANSFER_JS) if r["digest"] == layer.digest]
            assert row["route"] == "quay.io" and row["size"] == layer.size
            assert 0 < row["bytes"] <= HELD_AT < layer.size
            assert (row["max"], row["value"]) == (layer.size, row["bytes"])
            assert shown_bytes(layer.size) in row["text"] and "%" in row["text"]
            assert await page.evaluate("document.documentElement.lang") == "zh-CN"
            text = await page.evaluate("document.body.innerText")
            assert "命中率" in text and "进行中的传输" in text and "Hit ratio" not in text
            await next_render(page)  # ghcr.io is quiet: its numbers hold still
            assert_route_agrees(await page.evaluate(ROW_JS),
                                await metric_totals(http, base, "ghcr.io"), "ghcr.io")
            chinese = await page.screenshot(ARTIFACTS / "status-page-zh-CN.png")
        finally:
            gate.open()
        fetched = await pulling
        assert fetched.status == 200 and len(fetched.body) == layer.size

        async def gone() -> bool:
            return not await page.evaluate(TRANSFER_JS)

        await wait_until(gone, what="the finished transfer to leave the page")
        await next_render(page)
        assert_route_agrees(await page.evaluate(ROW_JS),
                            await metric_totals(http, base, "quay.io"), "quay.io")
        requests = list(page.requests)

    assert requests, "no request was recorded"
    outside = [url for url in requests if not url.startswith(f"{base}/")]
    assert outside == [], f"the page loaded something from outside the gateway: {outside}"
    assert {f"{base}/_gateway/static/status.js", f"{base}/_gateway/status.json"} <= set(requests)
    print(f"\nstatus page screenshots: {english} {chinese}")
    assert english.stat().st_size > 10_000 and chinese.stat().st_size > 10_000
