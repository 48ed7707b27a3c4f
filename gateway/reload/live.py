"""The running `Config`: one object, swapped whole when a reload succeeds, and the hooks
other parts plug into (checks before a swap, callbacks after it, files to watch).

Holds no file and does no I/O: the reloader (reloader.py) reads and validates the file.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from ..config import Config

log = logging.getLogger("gateway.reload")

# Awaited with the new config before it is swapped in (off the hot path; may read files
# in a thread); raising ConfigError refuses the whole reload.
Check = Callable[[Config], Awaitable[None]]
# Called with (old, new) right after the swap, synchronously, in the same loop step.
Callback = Callable[[Config, Config], None]
# The extra files a config names whose change on disk means "reload" (an htpasswd file).
Paths = Callable[[Config], Iterable[Path]]


class Live:
    """`live()` is the running config: the `current` every pipeline stage is built with."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.generation = 0  # how many reloads were swapped in
        self._checks: list[Check] = []
        self._callbacks: list[Callback] = []
        self._paths: list[Paths] = []

    def __call__(self) -> Config:
        return self._config

    @property
    def config(self) -> Config:
        return self._config

    # ------------------------------------------------------------ hooks

    def check_before_swap(self, check: Check) -> None:
        self._checks.append(check)

    def subscribe(self, callback: Callback) -> None:
        self._callbacks.append(callback)

    def watch_files(self, paths: Paths) -> None:
        self._paths.append(paths)

    # ------------------------------------------------------------ the reloader's side

    async def check(self, config: Config) -> None:
        for check in self._checks:
            await check(config)

    def files(self, config: Config) -> list[Path]:
        found: list[Path] = []
        for paths in self._paths:
            found += [Path(p) for p in paths(config) if Path(p) not in found]
        return found

    def swap(self, config: Config) -> Config:
        """Make `config` the running one; then every callback. Returns the old config."""
        old, self._config = self._config, config
        self.generation += 1
        for callback in self._callbacks:
            try:
                callback(old, config)
            except Exception:  # the swap happened: one broken hook must not undo the rest
                log.exception("a reload callback failed (%r)", callback)
        return old
