"""A stand-in for the `time` module inside one gateway module (monkeypatched in): real
time plus an offset a test moves forward. Only for code that has no injectable clock yet;
it never slows a test down.
"""

from __future__ import annotations

import time as real_time
from typing import Any


class Clock:
    """Real time plus an offset: `advance(seconds)` moves `time()` and `monotonic()`."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def time(self) -> float:
        return real_time.time() + self.offset

    def monotonic(self) -> float:
        return real_time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)
