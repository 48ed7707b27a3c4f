"""The single-flight coordinators (cache/coordinate*.py): one suite for the behaviour every
coordinator shares, and the file one's own promises (a lock file per key, a record a
follower reads whole or not at all, a dead leader's key taken over).

Two FileCoordinators in one process stand for two workers: flock locks belong to open
files, so they exclude each other as two processes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cache.coordinate import (
    FAILED,
    STARTING,
    STREAMING,
    VERIFIED,
    Coordinator,
    Follow,
    InProcess,
    Progress,
)
from gateway.cache.coordinate_files import FileCoordinator, FileFollow, FileLead, decode, encode
from gateway.cache.diskfull import DiskFull
from gateway.cache.flight import BlobFlight, FetchAborted
from gateway.cache.follow import follow
from gateway.errors import RegistryError
from gateway.metrics import Metrics
from gateway.reference import parse_digest
from tests.support.wait import wait_until


@dataclass
class Transfer:
    spool: Path
    size: int | None = None
    written: int = 0
    done: bool = False
    error: BaseException | None = None
    headers_known: bool = False


@pytest.fixture(params=["in-process", "files"])
async def coordinator(request: pytest.FixtureRequest, tmp_path: Path) -> Coordinator:
    made: Coordinator = InProcess() if request.param == "in-process" else \
        FileCoordinator(tmp_path)
    await made.open(sweep=True)
    return made


async def test_the_first_claim_of_a_key_leads(coordinator: Coordinator) -> None:
    lead = await coordinator.claim("blob a")
    assert not isinstance(lead, Follow)
    lead.publish(Transfer(Path("/spool"), 10, 5, headers_known=True))
    await lead.release()
    again = await coordinator.claim("blob a")  # released: the next one leads again
    assert not isinstance(again, Follow)
    await again.release()


async def test_a_turn_is_held_alone(coordinator: Coordinator) -> None:
    async with coordinator.turn("manifest m") as waited:
        assert waited is False


async def test_two_workers_one_leads_and_the_other_follows_to_the_end(tmp_path: Path) -> None:
    one, two = FileCoordinator(tmp_path), FileCoordinator(tmp_path)
    await one.open(sweep=True)
    await two.open(sweep=False)
    lead = await one.claim("blob b")
    follow = await two.claim("blob b")
    assert isinstance(lead, FileLead) and isinstance(follow, FileFollow)
    transfer = Transfer(tmp_path / "spool-1")
    lead.publish(transfer)
    seen = follow.progress()
    assert seen is not None and seen.state == STARTING
    transfer.size, transfer.written, transfer.headers_known = 100, 40, True
    lead.publish(transfer)
    seen = follow.progress()
    assert seen is not None
    assert (seen.state, seen.size, seen.written, seen.spool) == (STREAMING, 100, 40,
                                                                 tmp_path / "spool-1")
    assert await follow.leader_gone() is None  # it is alive and holds the lock
    transfer.written, transfer.done = 100, True
    lead.publish(transfer)
    await lead.release()
    assert await follow.leader_gone() is None  # it ended: the record says how
    seen = follow.progress()
    assert seen is not None and seen.state == VERIFIED and seen.written == 100
    await follow.close()
    assert list((tmp_path / ".flight").iterdir()) == [], "the lock file stayed behind"


async def test_a_failed_leader_tells_its_followers_why(tmp_path: Path) -> None:
    one, two = FileCoordinator(tmp_path), FileCoordinator(tmp_path)
    lead = await one.claim("blob c")
    follow = await two.claim("blob c")
    assert isinstance(follow, FileFollow)
    lead.publish(Transfer(tmp_path / "s", error=RegistryError("BLOB_UNKNOWN", "no such", 404)))
    seen = follow.progress()
    assert seen is not None and seen.state == FAILED
    assert seen.error == ("BLOB_UNKNOWN", "no such", 404)
    await lead.release()
    await follow.close()


async def test_a_follower_takes_over_from_a_leader_that_died(tmp_path: Path) -> None:
    one, two = FileCoordinator(tmp_path), FileCoordinator(tmp_path)
    lead = await one.claim("blob d")
    follow = await two.claim("blob d")
    assert isinstance(lead, FileLead) and isinstance(follow, FileFollow)
    lead.publish(Transfer(tmp_path / "s", 10, 3, headers_known=True))
    # kill -9: the kernel lets the lock go (the mapping holds a copy of the descriptor);
    # nothing is unlinked.
    assert lead._map is not None
    lead._map.close()
    os.close(lead._fd)
    taken = await follow.leader_gone()
    assert isinstance(taken, FileLead)
    third = await FileCoordinator(tmp_path).claim("blob d")
    assert isinstance(third, FileFollow), "two leaders for one key"
    await third.close()
    await taken.release()


async def test_a_turn_waits_for_the_other_worker_and_says_so(tmp_path: Path) -> None:
    one, two = FileCoordinator(tmp_path), FileCoordinator(tmp_path)
    await one.open(sweep=False)
    order: list[str] = []

    async def second() -> None:
        async with two.turn("tag t") as waited:
            order.append(f"second waited={waited}")

    async with one.turn("tag t") as waited:
        assert waited is False
        task = asyncio.create_task(second())
        await asyncio.sleep(0.1)
        order.append("first done")
    await task
    assert order == ["first done", "second waited=True"]


def test_a_torn_or_foreign_record_is_never_read() -> None:
    record = encode(Progress(7, STREAMING, 100, 50, Path("/data/.spool/1/abc")))
    assert decode(record) == Progress(7, STREAMING, 100, 50, Path("/data/.spool/1/abc"))
    torn = bytearray(record)
    torn[20] ^= 0xFF  # a byte of `written` changed under the reader
    assert decode(bytes(torn)) is None
    assert decode(b"\0" * 4096) is None
    assert decode(b"") is None


# ---------------------------------------------------------------- following (cache/follow.py)

def _flight(tmp_path: Path, data: bytes) -> BlobFlight:
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    return BlobFlight(digest, tmp_path / "never-used", tmp_path / "committed", orphan_limit=1,
                      disk=DiskFull(Metrics(), time.time), route="docker.io")


async def _read_all(flight: BlobFlight) -> bytes:
    await flight.wait_headers()
    out = bytearray()
    async with contextlib.aclosing(flight.stream()) as chunks:
        async for data in chunks:
            out += data
    return bytes(out)


async def test_a_follower_streams_the_leaders_spool_and_its_last_byte_after_verification(
        tmp_path: Path) -> None:
    data = os.urandom(300_000)
    spool = tmp_path / "leader-spool"
    spool.write_bytes(data[:100_000])
    lead = await FileCoordinator(tmp_path).claim("blob e")
    claim = await FileCoordinator(tmp_path).claim("blob e")
    assert isinstance(lead, FileLead) and isinstance(claim, FileFollow)
    flight = _flight(tmp_path, data)
    following = asyncio.create_task(follow(flight, claim))
    reader = asyncio.create_task(_read_all(flight))
    lead.publish(Transfer(spool, len(data), 100_000, headers_known=True))
    await wait_until(lambda: flight.written == 100_000, what="the follower to see progress")
    assert not reader.done() and not flight.done
    with spool.open("ab") as file:
        file.write(data[100_000:])
    lead.publish(Transfer(spool, len(data), len(data), done=True, headers_known=True))
    spool.rename(tmp_path / "committed")  # the leader commits it as readers go on
    await lead.release()
    assert await following is None
    assert await reader == data


async def test_a_leader_that_dies_before_its_first_byte_hands_over(tmp_path: Path) -> None:
    lead = await FileCoordinator(tmp_path).claim("blob f")
    claim = await FileCoordinator(tmp_path).claim("blob f")
    assert isinstance(lead, FileLead) and isinstance(claim, FileFollow)
    flight = _flight(tmp_path, b"x")
    following = asyncio.create_task(follow(flight, claim))
    lead.publish(Transfer(tmp_path / "s"))  # STARTING: no headers yet
    assert lead._map is not None
    lead._map.close()
    os.close(lead._fd)  # kill -9
    taken = await asyncio.wait_for(following, 5)
    assert isinstance(taken, FileLead), "the follower should lead now"
    assert flight.error is None and not flight.headers_known  # untouched: ours to run
    await taken.release()


async def test_a_leader_that_dies_mid_transfer_fails_the_followers_cleanly(
        tmp_path: Path) -> None:
    data = os.urandom(50_000)
    spool = tmp_path / "leader-spool"
    spool.write_bytes(data[:20_000])
    lead = await FileCoordinator(tmp_path).claim("blob g")
    claim = await FileCoordinator(tmp_path).claim("blob g")
    assert isinstance(lead, FileLead) and isinstance(claim, FileFollow)
    flight = _flight(tmp_path, data)
    following = asyncio.create_task(follow(flight, claim))
    lead.publish(Transfer(spool, len(data), 20_000, headers_known=True))
    await wait_until(lambda: flight.written == 20_000, what="the follower to see progress")
    assert lead._map is not None
    lead._map.close()
    os.close(lead._fd)  # kill -9 mid-transfer
    assert await asyncio.wait_for(following, 5) is None
    with pytest.raises(FetchAborted):
        await _read_all(flight)
