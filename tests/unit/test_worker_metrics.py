"""metrics.py with workers (`serve --workers N`): a worker's changes stay in memory until
it writes them to its file (at each loop-lag tick, at exit, before it renders), and
/metrics, whichever worker answers, adds up every worker's values, a dead one's counters
included.

Two workers are simulated in one process: each `Metrics` is built with a value class of
its own, named by a made-up process id, in a temporary metrics directory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from gateway.looplag import LoopLag
from gateway.metrics import Metrics, deferred_value_class, forget_process
from tests.support.wait import wait_until


def total(metrics: Metrics, name: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(
        metrics.render().decode()) for sample in family.samples if sample.name == name)


def worker(monkeypatch: pytest.MonkeyPatch, pid: int) -> Metrics:
    """A worker's metrics; its series must be made before the next worker is built (the
    library picks the value class when a labelled child is first used)."""
    monkeypatch.setattr(values, "ValueClass", deferred_value_class(lambda: pid))
    return Metrics()


def serve(metrics: Metrics, requests: int) -> None:
    for _ in range(requests):
        metrics.observe_request("docker.io", "blob", "GET", 200, 0.002, 4000)
        metrics.cache_outcome("docker.io", "blob", "hit")


@pytest.fixture
def directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return tmp_path


def test_values_are_written_in_batches_and_add_up_over_workers(
        directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = worker(monkeypatch, 101)
    serve(one, 3)
    two = worker(monkeypatch, 102)
    serve(two, 2)
    # The answering worker writes its own values first; the other's are not written yet.
    assert total(two, "gateway_requests_total") == 2
    one.flush()
    assert total(two, "gateway_requests_total") == 5
    assert total(one, "gateway_cache_requests_total") == 5
    assert total(two, "gateway_served_bytes_total") == 5 * 4000
    assert total(two, "gateway_request_duration_seconds_count") == 5
    serve(one, 1)
    assert total(one, "gateway_requests_total") == 6  # its own: to the moment
    # A worker that ended: its gauges no longer count, its counters still do.
    forget_process(directory, 101)
    assert total(two, "gateway_requests_total") == 6


def test_a_worker_continues_from_what_its_file_holds(
        directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = worker(monkeypatch, 103)
    serve(first, 4)
    first.flush()
    again = worker(monkeypatch, 103)  # the same file (as the library does for a pid)
    serve(again, 1)
    again.flush()
    assert total(again, "gateway_requests_total") == 5


async def test_the_loop_lag_tick_writes_a_workers_values(
        directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = worker(monkeypatch, 104)
    lag = LoopLag(one, interval=0.01)
    serve(one, 1)  # its series exist before the reader's value class is installed
    reader = worker(monkeypatch, 105)
    lag.start()
    try:
        serve(one, 2)
        await wait_until(lambda: total(reader, "gateway_requests_total") == 3,
                         what="the tick to write the worker's values")
        serve(one, 1)
    finally:
        await lag.close()  # and at exit, what came since the last tick
    assert total(reader, "gateway_requests_total") == 4


async def test_a_scrape_waits_for_every_workers_tick(
        directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = worker(monkeypatch, 106)
    lag = LoopLag(one)  # the served interval (50 ms)
    serve(one, 1)
    answering = worker(monkeypatch, 107)
    lag.start()
    try:
        serve(one, 5)
        body = await answering.scrape()
    finally:
        await lag.close()
    served = sum(s.value for f in text_string_to_metric_families(body.decode())
                 for s in f.samples if s.name == "gateway_requests_total")
    assert served == 6


async def test_one_process_scrapes_at_once() -> None:
    metrics = Metrics()  # the library's in-memory values: nothing to write, or wait for
    serve(metrics, 2)
    metrics.flush()
    assert await asyncio.wait_for(metrics.scrape(), 0.05) == metrics.render()
