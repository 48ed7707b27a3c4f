"""The event loop's lag: one task that sleeps a short interval and records how late it
woke into `gateway_event_loop_lag_seconds`; lateness is time the loop spent on work that
did not yield. It owns only that task and must do no work of its own on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib

from .metrics import Metrics

# 20 wake-ups a second cost a few microseconds each (~0.01% of a core), and a stall of
# a few milliseconds still lands in a sample: a stall of d seconds delays one wake-up by
# up to d, so the histogram sees every stall longer than the interval.
INTERVAL = 0.05


class LoopLag:
    def __init__(self, metrics: Metrics, interval: float = INTERVAL) -> None:
        self._histogram = metrics.event_loop_lag
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            # The selector rounds its timeout up to whole milliseconds, so an idle loop
            # wakes up to ~1 ms late: that is the floor, not lag, and stays in bucket one.
            self._histogram.observe(max(loop.time() - due, 0.0))
