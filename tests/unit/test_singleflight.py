"""SingleFlight and SharedCalls: one owned task per key, shared by every caller."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from gateway.singleflight import SharedCalls, SingleFlight


async def test_concurrent_callers_share_one_call() -> None:
    calls = SharedCalls[str, int]("test")
    started = 0
    gate = asyncio.Event()

    async def compute() -> int:
        nonlocal started
        started += 1
        await gate.wait()
        return 42

    waiting = [asyncio.create_task(calls.call("k", compute)) for _ in range(10)]
    await asyncio.sleep(0)
    assert len(calls) == 1
    gate.set()
    results = await asyncio.gather(*waiting)
    assert started == 1
    assert [value for value, _ in results] == [42] * 10
    assert sorted(first for _, first in results) == [False] * 9 + [True]
    assert len(calls) == 0, "the entry must leave when its call ends"


async def test_an_error_reaches_every_caller_and_the_next_call_starts_afresh() -> None:
    calls = SharedCalls[str, int]("test")
    attempts = 0

    async def compute() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        if attempts == 1:
            raise ValueError("upstream said no")
        return attempts

    first = await asyncio.gather(calls.call("k", compute), calls.call("k", compute),
                                 return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in first)
    assert await calls.call("k", compute) == (2, True)


async def test_a_caller_going_away_does_not_stop_the_call() -> None:
    calls = SharedCalls[str, str]("test")
    done = asyncio.Event()

    async def compute() -> str:
        await asyncio.sleep(0.01)
        done.set()
        return "kept"

    impatient = asyncio.create_task(calls.call("k", compute))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    await asyncio.wait_for(done.wait(), 5)
    assert await calls.call("k", compute) is not None


async def test_keys_are_independent_and_close_cancels_the_work() -> None:
    flights = SingleFlight[str, list[str]]("test")
    cancelled: list[str] = []

    def start(name: str) -> tuple[list[str], Coroutine[Any, Any, None]]:
        async def work() -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise
        return [name], work()

    a, began_a = flights.join("a", lambda: start("a"))
    b, began_b = flights.join("b", lambda: start("b"))
    again, began_again = flights.join("a", lambda: start("a2"))
    await asyncio.sleep(0)  # let both tasks begin
    assert (began_a, began_b, began_again) == (True, True, False)
    assert again is a and flights.get("b") is b and len(flights) == 2
    await flights.close()
    assert sorted(cancelled) == ["a", "b"] and len(flights) == 0
