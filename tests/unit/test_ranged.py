"""Parallel ranged fetch (cache/ranged.py) against the scripted fake upstream."""

from __future__ import annotations

import os

from tests.unit.test_cache import MakeWorld, read_all, world  # noqa: F401  (fixture)

MiB = 1 << 20
REPO = "owner/img"


async def test_big_blob_comes_in_parts(world: MakeWorld) -> None:  # noqa: F811
    w = await world(parallel_fetch_threshold=MiB, parallel_fetch_parts=4)
    data = os.urandom(10 * MiB + 123)
    digest = w.fake.add_blob(data)
    flight, _ = w.flight(digest)
    assert await read_all(flight) == data, flight.error


async def test_dbg(world: MakeWorld) -> None:  # noqa: F811
    import traceback
    w = await world(parallel_fetch_threshold=MiB, parallel_fetch_parts=4)
    data = os.urandom(10 * MiB + 123)
    digest = w.fake.add_blob(data)
    flight, _ = w.flight(digest)
    await flight.finished()
    traceback.print_exception(flight.error)
    assert 0
