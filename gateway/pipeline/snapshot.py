"""What stages compile from the config a request runs with (`RequestState.config`: the
one current when it arrived, for all of its stages, even if a reload swaps another in
meanwhile): `PerConfig` memoises a compiled value (a Router, a NetworkSet) against the
identity of the config. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from ..config import Config

T = TypeVar("T")


class PerConfig(Generic[T]):
    """`of(config)`: `compile(config)`, compiled again only when the config is another
    object. The last two are kept: while a reload drains, requests of the old config and
    of the new one interleave, and must not recompile on every flip."""

    __slots__ = ("_compile", "_last", "_previous")

    def __init__(self, compile: Callable[[Config], T]) -> None:
        self._compile = compile
        self._last: tuple[Config, T] | None = None
        self._previous: tuple[Config, T] | None = None

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
