"""The Index conformance suite (MemoryIndex now; sqlite and Redis join the fixture).
Time is injected: entries expire when the test moves the clock, never by sleeping."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cache import Index, MemoryIndex
from gateway.cache.policy import WIDE, TagEntry
from tests.support.clock import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock(frozen=1_700_000_000.0)


@pytest.fixture(params=["memory"])
def index(request: pytest.FixtureRequest, clock: Clock, tmp_path: Path) -> Index:
    return MemoryIndex(clock)


async def test_tags_round_trip(index: Index) -> None:
    key = ("ns", "library/nginx", "latest", WIDE)
    assert await index.tag(key) is None
    entry = TagEntry("sha256:" + "a" * 64, "application/vnd.oci.image.index.v1+json", 5.0)
    await index.set_tag(key, entry)
    assert await index.tag(key) == entry
    assert await index.tag(("other", "library/nginx", "latest", WIDE)) is None


async def test_blob_sizes_and_last_access(index: Index, clock: Clock) -> None:
    key = ("ns", "sha256:" + "b" * 64)
    assert await index.blob_size(key) is None
    await index.set_blob(key, 1234)
    assert await index.blob_size(key) == 1234
    assert await index.last_access(key) == clock()
    clock.advance(60)
    await index.touch(key)
    assert await index.last_access(key) == clock()
    await index.forget_blob(key)
    assert await index.blob_size(key) is None
    await index.touch(key)  # a blob the index does not know stays unknown
    assert await index.blob_size(key) is None


async def test_missing_entries_expire_with_the_clock(index: Index, clock: Clock) -> None:
    key = ("ns", "repo", "v1")
    await index.set_missing(key, 30)
    assert await index.missing(key)
    clock.advance(29)
    assert await index.missing(key)
    clock.advance(2)
    assert not await index.missing(key)
    await index.set_missing(key, 0)  # negative_ttl 0: never remembered
    assert not await index.missing(key)
