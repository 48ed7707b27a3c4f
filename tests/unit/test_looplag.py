"""The event-loop lag monitor: a call that blocks the loop shows up as lag in
gateway_event_loop_lag_seconds; an idle loop shows next to none; the gateway app runs
the monitor for its whole life and serves the histogram on /metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from gateway.looplag import LoopLag
from gateway.metrics import Metrics
from tests.support.wait import wait_until
from tests.unit.conftest import Gateway

NAME = "gateway_event_loop_lag_seconds"


def sample(metrics: Metrics, suffix: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(NAME + suffix, labels)
    return 0.0 if value is None else value


async def test_a_blocking_call_on_the_loop_shows_as_lag() -> None:
    metrics = Metrics()
    lag = LoopLag(metrics, interval=0.01)
    lag.start()
    try:
        await wait_until(lambda: sample(metrics, "_count") >= 2, what="the first samples")
        time.sleep(0.3)  # noqa: ASYNC251 - the stall under test
        before = sample(metrics, "_count")
        await wait_until(lambda: sample(metrics, "_count") > before, what="the late sample")
    finally:
        await lag.close()
    # The wake-up due during the stall came ~0.29 s late: one sample above 0.25 s.
    late = sample(metrics, "_count") - sample(metrics, "_bucket", le="0.25")
    assert late == 1
    assert sample(metrics, "_sum") >= 0.28


async def test_an_idle_loop_shows_next_to_no_lag() -> None:
    metrics = Metrics()
    lag = LoopLag(metrics, interval=0.01)
    lag.start()
    try:
        await asyncio.sleep(0.5)
    finally:
        await lag.close()
    count = sample(metrics, "_count")
    assert count >= 20  # ~50 wake-ups in 0.5 s; a busy shared machine may lose some
    # The selector rounds its timeout up to whole milliseconds: an idle loop wakes within
    # ~1 ms. Allow the odd sample a busy machine delays, not a habit.
    assert sample(metrics, "_bucket", le="0.005") >= 0.9 * count
    assert sample(metrics, "_sum") / count < 0.003


async def test_closing_stops_the_samples() -> None:
    metrics = Metrics()
    lag = LoopLag(metrics, interval=0.01)
    lag.start()
    await wait_until(lambda: sample(metrics, "_count") >= 1, what="a sample")
    await lag.close()
    stopped = sample(metrics, "_count")
    await asyncio.sleep(0.05)
    assert sample(metrics, "_count") == stopped
    await lag.close()  # twice is harmless


async def test_the_gateway_serves_its_loop_lag(
        gateway: Callable[..., Awaitable[Gateway]]) -> None:
    g = await gateway({"docker.io": {"upstream": "http://127.0.0.1:9"}},
                      default_route="docker.io")
    await wait_until(lambda: g.sample(NAME + "_count") >= 2, what="lag samples", timeout=5)
    resp = await g.client.get("/metrics")
    assert resp.status == 200
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    lag = families[NAME]
    assert lag.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in lag.samples if s.name == NAME + "_bucket"}
    assert buckets["0.001"] >= 0 and buckets["+Inf"] >= 2
