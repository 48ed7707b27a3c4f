"""Reloading routes.yaml live: on SIGHUP, or when the file (or a file it names) changes.

The new file is parsed and its secrets resolved in a thread; the upstreams of new or
changed routes are started; every check hook runs; only then is the whole config swapped
in, in one loop step. Anything that fails refuses the whole file: the running config
stays, and a log line and the `gateway_config_*` metrics say why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Config, load_config_file
from ..errors import ConfigError
from ..metrics import Metrics
from ..tasks import Background
from ..upstream_pool import UpstreamPool
from .live import Live
from .watch import Signature, changed, signatures

log = logging.getLogger("gateway.reload")

WATCH_INTERVAL = 2.0


class Reloader:
    def __init__(self, live: Live, upstreams: UpstreamPool, metrics: Metrics, *,
                 source: Path | None, interval: float = WATCH_INTERVAL,
                 load: Callable[[Path], Config] = load_config_file,
                 clock: Callable[[], float] = time.time) -> None:
        self.live = live
        self.source = source
        self.interval = interval
        self._upstreams = upstreams
        self._metrics = metrics
        self._load = load
        self._clock = clock
        self._lock = asyncio.Lock()
        self._wanted = asyncio.Event()
        self._reasons: list[str] = []
        self._seen: dict[Path, Signature] | None = None
        self._reloads = Background("reload")
        self._watch = Background("watch routes.yaml")

    async def start(self) -> None:
        """Start watching; what the files look like now is what the running config was
        read from (the caller read it just before)."""
        self._metrics.config_last_success.set(self._clock())
        self._metrics.config_last_ok.set(1)
        self._reloads.start(self._run())
        if self.source is not None and self.interval > 0:
            self._seen = await asyncio.to_thread(signatures, self._paths(self.live()))
            self._watch.start(self._watch_files())

    async def close(self) -> None:
        await self._watch.stop()
        await self._reloads.stop()

    def reload_soon(self, reason: str) -> None:
        """Reload in the background (a SIGHUP handler may call this); requests that
        arrive while a reload runs are merged into one more."""
        self._reasons.append(reason)
        self._wanted.set()

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            reasons, self._reasons = self._reasons, []
            try:
                await self.reload(", ".join(dict.fromkeys(reasons)))
            except Exception:  # a broken hook must not end reloading for good
                log.exception("reload failed")

    def _paths(self, config: Config) -> list[Path]:
        assert self.source is not None
        return [self.source, *(p for p in self.live.files(config) if p != self.source)]

    async def _watch_files(self) -> None:
        if self._seen is None:
            self._seen = await asyncio.to_thread(signatures, self._paths(self.live()))
        while True:
            await asyncio.sleep(self.interval)
            try:
                now = await asyncio.to_thread(signatures, self._paths(self.live()))
            except Exception:  # a hook naming files failed: look again next time
                log.exception("cannot look at the config files")
                continue
            found = changed(self._seen, now)
            if found and not self._lock.locked():
                # Seen now: one reload is asked for, not one more at every look until the
                # reload task gets to run (a busy loop may take longer than `interval`).
                self._seen = now
                self.reload_soon("changed on disk: " + ", ".join(map(str, found)))

    # ------------------------------------------------------------ one reload

    async def reload(self, reason: str = "") -> bool:
        """Read the file again and swap it in; False (and the old config stays) if it is
        refused. Never raises for a bad file."""
        async with self._lock:
            if self.source is None:
                log.info("nothing to reload (%s): the config was not read from a file", reason)
                return False
            # What the files look like before reading them: a change after this is seen
            # by the next look, a broken file is not read again until it changes.
            self._seen = await asyncio.to_thread(signatures, self._paths(self.live()))
            try:
                config = await asyncio.to_thread(self._load, self.source)
                self._seen.update(await asyncio.to_thread(
                    signatures, [p for p in self._paths(config) if p not in self._seen]))
                old = await self.apply(config)
            except ConfigError as exc:
                return self._refused(reason, str(exc))
            except Exception as exc:  # e.g. an upstream's ca_file that ssl cannot load
                log.debug("reload failed", exc_info=True)
                return self._refused(reason, f"{self.source}: {type(exc).__name__}: {exc}")
            self._metrics.config_reloads.labels("ok").inc()
            self._metrics.config_last_success.set(self._clock())
            self._metrics.config_last_ok.set(1)
            log.info("reloaded %s (%s): %s", self.source, reason or "asked", describe(old, config))
            return True

    def _refused(self, reason: str, message: str) -> bool:
        self._metrics.config_reloads.labels("error").inc()
        self._metrics.config_last_ok.set(0)
        log.error("not reloaded (%s), the running config stays: %s", reason or "asked", message)
        return False

    async def apply(self, config: Config) -> Config:
        """Swap `config` in: start its new upstreams, run the check hooks, then swap the
        config and the upstreams in one step. Raises (and changes nothing) if any of that
        fails. Returns the config that was running."""
        staged = await self._upstreams.prepare(config.routes)
        try:
            await self.live.check(config)
        except BaseException:
            await self._upstreams.discard(staged)
            raise
        # No await from here on: requests see either the old config and its upstreams,
        # or the new and its.
        self._upstreams.commit(staged)
        return self.live.swap(config)


def describe(old: Config, new: Config) -> str:
    """What a reload changed, for the log line: route names and section names only."""
    before = {r.name: r for r in old.routes}
    after = {r.name: r for r in new.routes}
    parts = [f"{len(new.routes)} routes"]
    for label, names in (("added", [n for n in after if n not in before]),
                         ("removed", [n for n in before if n not in after]),
                         ("changed", [n for n in after if n in before and before[n] != after[n]])):
        if names:
            parts.append(f"{label} {', '.join(names)}")
    sections = [f.name for f in dataclasses.fields(Config) if f.name not in ("routes", "source")
                and getattr(old, f.name) != getattr(new, f.name)]
    if sections:
        parts.append(f"changed {', '.join(sections)}")
    if len(parts) == 1:
        parts.append("no change")
    return "; ".join(parts)
