"""The circuit breaker of one upstream URL: closed, open (fail fast) for a cool-down after
too many consecutive failures, then half-open (one probe request; its answer decides).

A pure state machine over an injected clock: no I/O, no sleeping, no metrics of its own
(the caller reports transitions through `on_change`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class State(enum.IntEnum):
    """Also the value of the state gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


def _nothing(_state: State) -> None:
    pass


class Breaker:
    """`allow()` before each request; then exactly one of `success()`, `failure()` or
    `abandon()` (the request ended with no verdict, e.g. its caller was cancelled)."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float], *,
                 on_change: Callable[[State], None] = _nothing) -> None:
        self.threshold = failures  # 0: never opens
        self.cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at = 0.0
        self._probing = False  # half-open: the one probe is out

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self._on_change(state)

    def allow(self) -> bool:
        """May a request go to this upstream now? While half-open, only the first caller
        (the probe) is let through until the probe has its answer."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if self._clock() - self.opened_at < self.cooldown:
                return False
            self._set(State.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        self._set(State.CLOSED)

    def failure(self) -> None:
        if self.state is State.CLOSED:
            self.failures += 1
            if not self.threshold or self.failures < self.threshold:
                return
        # The threshold reached, or the probe (or a request let through before the
        # breaker opened) failed: fail fast for another cool-down.
        self._probing = False
        self.failures = 0
        self.opened_at = self._clock()
        self._set(State.OPEN)

    def abandon(self) -> None:
        """A request let through ended without an answer: a half-open breaker lets the
        next caller probe instead."""
        if self.state is State.HALF_OPEN:
            self._probing = False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 if it would now)."""
        if self.state is not State.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self._clock())
