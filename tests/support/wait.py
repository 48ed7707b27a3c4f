"""The one wait helper: poll for a state, never for a time. `wait_for` blocks (for tests
and fixtures that drive processes), `wait_until` awaits (inside a test's event loop); both
take the same arguments and fail the same way. Neither decides anything about timing.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable

Predicate = Callable[[], bool]
AsyncPredicate = Callable[[], bool | Awaitable[bool]]


def _no_diagnostics() -> str:
    return ""


class _Deadline:
    """What both variants share: when to give up, and how to say why."""

    def __init__(self, what: str, timeout: float, process: subprocess.Popen[bytes] | None,
                 diagnostics: Callable[[], str]) -> None:
        self.what = what
        self.timeout = timeout
        self.process = process
        self.diagnostics = diagnostics
        self.end = time.monotonic() + timeout

    def check(self) -> None:
        """Raise if the wait is over without the state: the process died or time is up."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.what}: process exited with status "
                               f"{self.process.returncode}\n{self.diagnostics()}")
        if time.monotonic() > self.end:
            raise AssertionError(f"timed out after {self.timeout:g}s waiting for {self.what}"
                                 f"\n{self.diagnostics()}")


def wait_for(predicate: Predicate, *, what: str, timeout: float = 30.0,
             interval: float = 0.02, process: subprocess.Popen[bytes] | None = None,
             diagnostics: Callable[[], str] = _no_diagnostics) -> None:
    """Poll `predicate` until it holds. AssertionError naming `what` after `timeout`
    seconds; RuntimeError at once if `process` exits first."""
    deadline = _Deadline(what, timeout, process, diagnostics)
    while not predicate():
        deadline.check()
        time.sleep(interval)


# `timeout` bounds the polling, as in `wait_for`; it is not a cancel scope (ASYNC109).
async def wait_until(predicate: AsyncPredicate, *, what: str,
                     timeout: float = 30.0,  # noqa: ASYNC109
                     interval: float = 0.02, process: subprocess.Popen[bytes] | None = None,
                     diagnostics: Callable[[], str] = _no_diagnostics) -> None:
    """`wait_for` for a coroutine: the event loop keeps running while it polls, and
    `predicate` may be a coroutine function (e.g. one that asks the gateway over HTTP)."""
    deadline = _Deadline(what, timeout, process, diagnostics)
    while not await _holds(predicate):
        deadline.check()
        await asyncio.sleep(interval)


async def _holds(predicate: AsyncPredicate) -> bool:
    result = predicate()
    if inspect.isawaitable(result):
        return bool(await result)
    return bool(result)
