"""The event loop's lag: one task that sleeps a short interval and records how late it
woke into `gateway_event_loop_lag_seconds`; lateness is time the loop spent on work that
did not yield. It owns only that task and must do no work of its own on the loop; the
same tick writes a worker's changed metrics to its file (`Metrics.flush`).
"""

from __future__ import annotations

import asyncio

from .metrics import Metrics
from .tasks import Background

# 20 wake-ups a second cost a few microseconds each (~0.01% of a core), and a stall of
# a few milliseconds still lands in a sample: a stall of d seconds delays one wake-up by
# up to d, so the histogram sees every stall longer than the interval.
INTERVAL = 0.05


class LoopLag:
    def __init__(self, metrics: Metrics, interval: float = INTERVAL) -> None:
        self._histogram = metrics.event_loop_lag
        self._flush = metrics.flush  # one tick for both: no second task waking the loop
        self._interval = interval
        self._task = Background("loop-lag")

    def start(self) -> None:
        self._task.start(self._run())

    async def close(self) -> None:
        await self._task.stop()
        self._flush()  # what was counted since the last tick, before the worker exits

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            # The selector rounds its timeout up to whole milliseconds, so an idle loop
            # wakes up to ~1 ms late: that is the floor, not lag, and stays in bucket one.
            self._histogram.observe(max(loop.time() - due, 0.0))
            self._flush()
