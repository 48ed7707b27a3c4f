"""The config a request runs with: the one that was current when it arrived, for all of
its stages, even if a reload swaps another in meanwhile; and what stages compile from it.

`Snapshot` is the `current` every stage is built with; `PerConfig` memoises a compiled
value (a Router, a NetworkSet) against the identity of the config. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Generic, TypeVar

from ..config import Config

T = TypeVar("T")


class Snapshot:
    """`snapshot()`: inside a request, the config it started with (pinned by the first
    stage); outside one, the running config."""

    def __init__(self, live: Callable[[], Config]) -> None:
        self.live = live
        # One variable per app (not per request): each request's task holds its own value.
        self._pinned: ContextVar[Config | None] = ContextVar("request config", default=None)

    def __call__(self) -> Config:
        pinned = self._pinned.get()
        return pinned if pinned is not None else self.live()

    def pin(self) -> tuple[Config, Token[Config | None]]:
        config = self.live()
        return config, self._pinned.set(config)

    def unpin(self, token: Token[Config | None]) -> None:
        self._pinned.reset(token)


class PerConfig(Generic[T]):
    """`compiled()`: `compile(current())`, compiled again only when the config is another
    object. The last two are kept: while a reload drains, requests of the old config and
    of the new one interleave, and must not recompile on every flip."""

    __slots__ = ("_compile", "_current", "_last", "_previous")

    def __init__(self, current: Callable[[], Config], compile: Callable[[Config], T]) -> None:
        self._current = current
        self._compile = compile
        self._last: tuple[Config, T] | None = None
        self._previous: tuple[Config, T] | None = None

    def __call__(self) -> T:
        return self.of(self._current())

    def of(self, config: Config) -> T:
        last = self._last
        if last is not None and last[0] is config:
            return last[1]
        previous = self._previous
        if previous is not None and previous[0] is config:
            self._last, self._previous = previous, last
            return previous[1]
        value = self._compile(config)
        self._last, self._previous = (config, value), last
        return value
