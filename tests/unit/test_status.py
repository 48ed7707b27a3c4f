"""The operator side of gateway/admin: /readyz (its checks, their cache, what it tells
strangers), the status page and its JSON (who may read them, what they say next to
/metrics), the bounded counter of pulls per repository, the page's language."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admin import Readiness, TopK, store_reachable, writable
from gateway.admin.page import CSP, language
from gateway.admin.ready import Outcome, public_body
from gateway.admin.samples import Samples
from gateway.admin.status import route_status
from gateway.cache import FsStore
from gateway.config import Route
from gateway.metrics import Metrics
from tests.support.clock import Clock
from tests.support.fake_registry import image_manifest
from tests.support.faults import Fault, Gate
from tests.support.unwritable import unwritable
from tests.support.wait import wait_until

from .conftest import make_route

FORWARDED = "X-Forwarded-For"
STRANGER = "192.0.2.7"

# -- the bounded counter ------------------------------------------------------------------


def test_topk_counts_exactly_below_its_capacity() -> None:
    top: TopK[str] = TopK(capacity=10)
    for name in ["a"] * 5 + ["b"] * 3 + ["c"]:
        top.add(name)
    assert [(c.key, c.count, c.error) for c in top.top(10)] == [
        ("a", 5, 0), ("b", 3, 0), ("c", 1, 0)]


def test_topk_never_holds_more_than_its_capacity_and_keeps_the_heavy_hitters() -> None:
    top: TopK[str] = TopK(capacity=50)
    for round_ in range(200):
        top.add("popular")
        top.add("second")
        for stranger in range(20):  # a flood of names asked once each
            top.add(f"random-{round_}-{stranger}")
        assert len(top) <= 50
    ranked = top.top(2)
    assert [c.key for c in ranked] == ["popular", "second"]
    assert all(c.count - c.error <= 200 <= c.count for c in ranked)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=30), max_size=300),
       st.integers(min_value=1, max_value=12))
def test_topk_bounds_hold_for_any_stream(stream: list[int], capacity: int) -> None:
    """Space-Saving's guarantees: the counts sum to the stream's length, each held key's
    true count lies in [count - error, count], and any key seen more than n/k times is held."""
    top: TopK[int] = TopK(capacity)
    for item in stream:
        top.add(item)
    true = Counter(stream)
    held = top.top(capacity)
    assert len(held) <= capacity
    assert sum(c.count for c in held) == len(stream)
    for c in held:
        assert c.count - c.error <= true[c.key] <= c.count
    for key, count in true.items():
        if count > len(stream) / capacity:
            assert key in {c.key for c in held}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=30),
                          st.integers(min_value=1, max_value=9)), max_size=200),
       st.integers(min_value=1, max_value=12))
def test_topk_weighted_adds_keep_the_bounds(stream: list[tuple[int, int]],
                                            capacity: int) -> None:
    """`add(key, n)` (how Pulls folds its pending counts in) keeps the same guarantees as
    n adds of one, and is exact below the capacity."""
    top: TopK[int] = TopK(capacity)
    for item, times in stream:
        top.add(item, times)
    true: Counter[int] = Counter()
    for item, times in stream:
        true[item] += times
    held = top.top(capacity)
    assert len(held) <= capacity
    assert sum(c.count for c in held) == sum(true.values())
    for c in held:
        assert c.count - c.error <= true[c.key] <= c.count
        if len(true) <= capacity:
            assert c.error == 0


# -- the page's language ------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    (None, "en"), ("", "en"), ("zh-CN,zh;q=0.9,en;q=0.8", "zh-CN"), ("zh", "zh-CN"),
    ("zh-TW", "zh-CN"), ("en-US,en;q=0.9,zh-CN;q=0.8", "en"), ("fr-FR,zh-CN;q=0.5", "zh-CN"),
    ("en;q=0.2,zh-CN;q=0.9", "zh-CN"), ("de", "en"), ("zh-CN;q=0,en", "en"),
    ("zh-CN;q=bogus,en;q=0.1", "en"),
])
def test_the_page_follows_accept_language(header: str | None, expected: str) -> None:
    assert language(header) == expected


# -- readiness ------------------------------------------------------------------------------


async def test_readiness_is_cached_for_its_ttl_and_shared_by_concurrent_callers() -> None:
    clock = Clock(frozen=0.0)
    calls = 0

    async def check() -> str | None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return None

    readiness = Readiness([("counted", check)], ttl=1.5, clock=clock)
    readiness.serving = True
    answers = await asyncio.gather(*(readiness.outcomes() for _ in range(20)))
    assert calls == 1 and all(all(o.ok for o in a) for a in answers)
    clock.advance(1.0)
    await readiness.outcomes()
    assert calls == 1, "asked again within the TTL"
    clock.advance(1.0)
    await readiness.outcomes()
    assert calls == 2
    await readiness.close()


async def test_a_hung_or_broken_check_fails_instead_of_hanging() -> None:
    async def hangs() -> str | None:
        await asyncio.sleep(10)
        return None

    async def breaks() -> str | None:
        raise RuntimeError("with /secret/path inside")

    readiness = Readiness([("hangs", hangs), ("breaks", breaks)], ttl=0, timeout=0.05)
    found = {o.name: o.reason for o in await readiness.outcomes()}
    assert found == {"started": "not serving (starting or stopping)",
                     "hangs": "timed out after 0.05 s", "breaks": "check failed (RuntimeError)"}
    await readiness.close()


async def test_the_write_probe_fails_when_the_data_directory_refuses_files(
        tmp_path: Path) -> None:
    check = writable(tmp_path)
    assert await check() is None
    assert os.listdir(tmp_path) == [], "the probe file is removed"
    with unwritable(tmp_path):
        with pytest.raises(PermissionError):
            (tmp_path / "sanity").write_bytes(b"x")  # the test's own premise, as root too
        reason = await check()
    assert reason is not None and reason.startswith("data directory not writable (E")
    assert str(tmp_path) not in reason
    assert await check() is None


async def test_a_write_probe_stuck_in_the_kernel_is_not_started_again(
        tmp_path: Path, monkeypatch: Any) -> None:
    release = threading.Event()
    started = []

    def stuck(path: Path) -> None:
        started.append(path)
        release.wait(10)

    monkeypatch.setattr("gateway.admin.ready._probe", stuck)
    readiness = Readiness([("data_dir", writable(tmp_path))], ttl=0, timeout=0.05)
    try:
        reasons = [{o.name: o.reason for o in await readiness.outcomes()}["data_dir"]
                   for _ in range(3)]
    finally:
        release.set()
    assert reasons == ["timed out after 0.05 s"] + [
        "the last write probe has not returned (hung disk?)"] * 2
    assert len(started) == 1
    await asyncio.sleep(0.05)
    await readiness.close()


async def test_the_write_probe_fails_when_its_path_cannot_be_a_file(tmp_path: Path) -> None:
    (tmp_path / f".readyz-{os.getpid()}").mkdir()  # EISDIR, for root too
    assert await writable(tmp_path)() == "data directory not writable (EISDIR)"


async def test_a_store_with_a_ready_hook_is_asked(tmp_path: Path) -> None:
    class Remote:
        answer: str | None = "bucket unreachable (ConnectTimeout)"

        async def ready(self) -> str | None:
            return self.answer

    store = Remote()
    check = store_reachable(store, None)
    assert await check() == "bucket unreachable (ConnectTimeout)"
    store.answer = None
    assert await check() is None
    local = FsStore(tmp_path, tmp_path / ".spool")
    assert await store_reachable(local, tmp_path / "gone")() == "store directory missing"
    assert await store_reachable(local, tmp_path)() is None
    assert await store_reachable(object(), tmp_path / "gone")() is None  # nothing to ask


def test_the_public_answer_names_checks_only() -> None:
    status, body = public_body([Outcome("started", None),
                                Outcome("storage", "s3 at http://10.0.0.1:9000 said 403")])
    assert (status, body) == (503, {"ready": False, "failing": ["storage"]})
    assert public_body([Outcome("started", None)]) == (200, {"ready": True})


# -- the endpoints in the app -----------------------------------------------------------


async def _admin_gateway(registry: Any, gateway: Any, **route: Any) -> tuple[Any, Any]:
    fake = await registry()
    gw = await gateway({"ghcr.io": {"upstream": fake.url, **route}},
                       trusted_proxies=["127.0.0.1"], access={"deny": ["198.51.100.0/24"]})
    return gw, fake


async def test_readyz_turns_unready_when_the_data_directory_is_not_writable_or_it_stops(
        registry: Any, gateway: Any) -> None:
    gw, _ = await _admin_gateway(registry, gateway)
    ok = await gw.client.get("/readyz")
    assert ok.status == 200 and await ok.json() == {"ready": True}
    assert ok.headers["Cache-Control"] == "no-store"
    with unwritable(gw.data_dir):
        await asyncio.sleep(1.6)  # past the cached answer

        async def refused() -> bool:
            return (await gw.client.get("/readyz")).status == 503

        await wait_until(refused, what="/readyz to turn 503")
        answer = await gw.client.get("/readyz", headers={FORWARDED: STRANGER})
        text = await answer.text()
        assert answer.status == 503 and json.loads(text) == {"ready": False,
                                                             "failing": ["data_dir"]}
        assert str(gw.data_dir) not in text
        status = await (await gw.client.get("/_gateway/status.json")).json()
        assert status["ready"]["ready"] is False
        (data_dir,) = [c for c in status["ready"]["checks"] if c["name"] == "data_dir"]
        assert data_dir["reason"].startswith("data directory not writable")
    await asyncio.sleep(1.6)
    assert (await gw.client.get("/readyz")).status == 200
    await gw.app.shutdown()  # what the runner does once the listeners are closed
    stopping = await gw.client.get("/readyz")
    assert stopping.status == 503 and await stopping.json() == {"ready": False,
                                                               "failing": ["started"]}


async def test_health_checks_are_open_and_the_status_page_is_for_admins(
        registry: Any, gateway: Any) -> None:
    gw, _ = await _admin_gateway(registry, gateway)
    for address in (STRANGER, "198.51.100.1"):  # not admin; and even a denied network
        for path in ("/healthz", "/readyz"):
            answer = await gw.client.get(path, headers={FORWARDED: address})
            assert answer.status == 200, (path, address)
    for path in ("/_gateway/", "/_gateway/status.json", "/_gateway/static/status.js",
                 "/_gateway/static/status.css", "/_gateway/static/icon.svg"):
        refused = await gw.client.get(path, headers={FORWARDED: STRANGER})
        assert refused.status == 403, path
        (error,) = (await refused.json())["errors"]
        assert error["code"] == "DENIED" and "access.admin" in error["message"]
        assert (await gw.client.get(path)).status == 200, path  # loopback is admin
    assert gw.sample("gateway_refusals_total", route="-", reason="admin_only") == 5
    moved = await gw.client.get("/_gateway", allow_redirects=False)
    assert moved.status == 308 and moved.headers["Location"] == "/_gateway/"


async def test_the_page_and_its_assets_come_from_the_gateway_in_the_browsers_language(
        registry: Any, gateway: Any) -> None:
    gw, _ = await _admin_gateway(registry, gateway)
    zh = await gw.client.get("/_gateway/", headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    html = await zh.text()
    assert zh.headers["Content-Type"] == "text/html; charset=utf-8"
    assert zh.headers["Content-Security-Policy"] == CSP
    assert '<html lang="zh-CN">' in html
    en = await (await gw.client.get("/_gateway/", headers={"Accept-Language": "en-GB"})).text()
    assert '<html lang="en">' in en
    assert '<html lang="zh-CN">' in await (await gw.client.get("/_gateway/?lang=zh-CN")).text()
    for ref in ("http://", "https://", "//fonts", "cdn"):
        assert ref not in html.lower().replace("http://www.w3.org", "")
    js = await gw.client.get("/_gateway/static/status.js")
    assert js.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert '"zh-CN": {' in await js.text()  # both languages' strings ship with the page
    assert (await gw.client.get("/_gateway/static/../__init__.py")).status == 404
    assert (await gw.client.get("/_gateway/static/index.html")).status == 404


def _families(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


async def test_status_json_says_what_metrics_says_and_shows_a_transfer_in_flight(
        registry: Any, gateway: Any) -> None:
    gw, fake = await _admin_gateway(registry, gateway)
    layer = os.urandom(300_000)
    digest = fake.fake.add_blob(layer)
    fake.fake.add_manifest("owner/app", image_manifest(layer), tag="v1")
    manifest = "/v2/ghcr.io/owner/app/manifests/v1"
    blob = f"/v2/ghcr.io/owner/app/blobs/{digest}"
    for _ in range(3):
        assert (await gw.client.get(manifest)).status == 200
    assert (await gw.client.get("/v2/ghcr.io/owner/other/manifests/v1")).status == 404
    first = await gw.client.get(blob)
    assert await first.read() == layer
    await wait_until(lambda: gw.sample("gateway_inflight_fetches", route="ghcr.io") == 0,
                     what="the commit")
    again = await gw.client.get(blob)
    assert await again.read() == layer and again.headers["X-Cache"] == "HIT"

    status = await (await gw.client.get("/_gateway/status.json")).json()
    samples = _families(await (await gw.client.get("/metrics")).text())
    (route,) = status["routes"]
    lookups = {r: _total(samples, "gateway_cache_requests_total", route="ghcr.io", result=r)
               for r in ("hit", "miss", "stale", "coalesced")}
    assert route["lookups"] == lookups
    assert route["hit_ratio"] == pytest.approx(lookups["hit"] / sum(lookups.values()))
    served = _total(samples, "gateway_served_bytes_total", route="ghcr.io")
    fetched = _total(samples, "gateway_upstream_bytes_total", route="ghcr.io")
    assert route["served_bytes"] == served and route["upstream_bytes"] == fetched
    assert route["saved_bytes"] == served - fetched > len(layer) - 1
    assert route["upstream"]["errors"] == {"http_404": 1}
    assert route["upstream"]["last_error"]["reason"] == "http_404"
    assert route["upstream"]["health"] == "ok"  # a missing image is no upstream trouble
    assert route["upstream"]["latency"]["count"] == _total(
        samples, "gateway_upstream_request_duration_seconds_count", route="ghcr.io")
    assert route["upstream"]["endpoints"] == [{"url": fake.url, "breaker": "closed"}]
    assert status["top_repositories"][0] == {"route": "ghcr.io", "repository": "owner/app",
                                             "pulls": 3, "error": 0}
    assert status["transfers"] == []

    gate = Gate()
    big = os.urandom(2_000_000)
    big_digest = fake.fake.add_blob(big)
    fake.fake.queue("GET", f"/v2/owner/app/blobs/{big_digest}", Fault(stall_at=500_000, gate=gate))
    started = await gw.client.get(f"/v2/ghcr.io/owner/app/blobs/{big_digest}")
    try:
        await wait_until(lambda: gate.reached, what="the upstream to stall")

        async def listed() -> list[dict[str, Any]]:
            doc = await (await gw.client.get("/_gateway/status.json")).json()
            return list(doc["transfers"])

        async def progressed() -> bool:
            return any(t["bytes"] > 0 for t in await listed())

        await wait_until(progressed, what="the transfer to be listed with its progress")
        (transfer,) = await listed()
        assert transfer["route"] == "ghcr.io" and transfer["digest"] == big_digest
        assert transfer["size"] == len(big) and 0 < transfer["bytes"] < len(big)
        assert transfer["followed"] is True and transfer["verified"] is False
    finally:
        gate.open()
    assert await started.read() == big


def test_the_assets_ship_as_package_data() -> None:
    """A wheel without them would serve a page whose script 404s (pip install, the image)."""
    import tomllib

    from gateway.admin.page import ASSETS

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "static/*" in project["tool"]["setuptools"]["package-data"]["gateway.admin"]
    static = root / "gateway" / "admin" / "static"
    assert {p.name for p in static.iterdir()} == {"index.html", *ASSETS}


def _health(metrics: Metrics, route: Route, now: float) -> dict[str, Any]:
    return route_status(Samples(metrics.render().decode()), route, now)["upstream"]


def test_upstream_health_reads_breakers_backoff_and_recent_failures() -> None:
    metrics = Metrics()
    route = make_route("http://127.0.0.1:1", name="r")
    primary = metrics.breaker_state.labels("r", "http://127.0.0.1:1")
    fallback = metrics.breaker_state.labels("r", "http://127.0.0.1:2")
    primary.set(0)
    fallback.set(0)
    now = time.time()
    assert _health(metrics, route, now)["health"] == "ok"
    metrics.upstream_error("r", "http_404")  # a missing image: no trouble upstream
    found = _health(metrics, route, now)
    assert found["health"] == "ok" and found["last_error"]["reason"] == "http_404"
    metrics.upstream_error("r", "timeout")
    found = _health(metrics, route, time.time())
    assert found["health"] == "degraded" and found["last_error"]["reason"] == "timeout"
    assert found["errors"] == {"http_404": 1, "timeout": 1}
    assert _health(metrics, route, time.time() + 301)["health"] == "ok"  # long ago
    primary.set(1)
    assert _health(metrics, route, time.time() + 301)["health"] == "degraded"
    fallback.set(1)
    found = _health(metrics, route, time.time() + 301)
    assert found["health"] == "down"
    assert found["endpoints"] == [{"url": "http://127.0.0.1:1", "breaker": "open"},
                                  {"url": "http://127.0.0.1:2", "breaker": "open"}]
    primary.set(0)
    fallback.set(0)
    metrics.upstream_backoff_until.labels("r").set(time.time() + 60)
    metrics.ratelimit_remaining.labels("r", "ci").set(7)
    metrics.ratelimit_limit.labels("r", "ci").set(100)
    found = _health(metrics, route, time.time() + 30)
    assert found["health"] == "down"
    assert found["ratelimit"] == [{"account": "ci", "limit": 100, "remaining": 7}]
