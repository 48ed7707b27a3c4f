"""The clock a test gives the gateway (`create_app(clock=...)`, `Cache`, `Upstream`): wall
seconds that move when the test says so, so no test sleeps past a TTL or a token's life.
"""

from __future__ import annotations

import time


class Clock:
    """Real time plus an offset that `advance()` moves; `Clock(frozen=t)` stands still at t
    (plus the offset) for tests that compare times exactly."""

    def __init__(self, *, frozen: float | None = None) -> None:
        self.offset = 0.0
        self.frozen = frozen

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __call__(self) -> float:
        return (time.time() if self.frozen is None else self.frozen) + self.offset

    def time(self) -> float:
        return self()
