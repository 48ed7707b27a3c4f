"""The started upstream clients of the running config, one per route, across reloads.

A reload keeps the `Upstream` (its ClientSession, its token cache) of every route whose
value is unchanged, starts new ones before the new config is swapped in, and closes a
replaced one only once nothing uses it any more, so no transfer is ever cut. Talks to
no upstream itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

from .config import Route
from .singleflight import SharedCalls
from .upstream import Upstream

log = logging.getLogger("gateway.upstreams")


@dataclass
class Staged:
    """The upstreams of a config about to be swapped in; `new` are started, unused."""

    chosen: dict[str, tuple[Route, Upstream]]
    new: list[Upstream] = field(default_factory=list)


class UpstreamPool:
    def __init__(self, make: Callable[[Route], Upstream]) -> None:
        self._make = make
        self._current: dict[str, tuple[Route, Upstream]] = {}
        # Replaced by a reload (or started late, for a request of an older config) and
        # closed once drained: id(upstream) -> (its route, it).
        self._retiring: dict[int, tuple[Route, Upstream]] = {}
        self._closing: dict[int, asyncio.Task[None]] = {}
        self._late: SharedCalls[Route, Upstream] = SharedCalls("late upstream")

    # ------------------------------------------------------------ the running set

    async def start(self, routes: Iterable[Route]) -> None:
        self.commit(await self.prepare(routes))

    async def prepare(self, routes: Iterable[Route]) -> Staged:
        """The upstreams for `routes`: the running one of a route whose value is unchanged,
        a new, started one otherwise. Nothing is in use until `commit`."""
        staged = Staged({})
        try:
            for route in routes:
                upstream = self._running(route)
                if upstream is None:
                    upstream = self._make(route)
                    staged.new.append(upstream)
                    await upstream.start()
                staged.chosen[route.name] = (route, upstream)
        except BaseException:
            await self.discard(staged)
            raise
        return staged

    async def discard(self, staged: Staged) -> None:
        """A refused reload: close what `prepare` started."""
        await asyncio.gather(*(upstream.close() for upstream in staged.new),
                             return_exceptions=True)

    def commit(self, staged: Staged) -> None:
        """Make `staged` the running set (synchronous: the same instant as the config swap);
        what it no longer holds closes once drained."""
        kept = {id(upstream) for _route, upstream in staged.chosen.values()}
        for route, upstream in self._current.values():
            if id(upstream) not in kept:
                self._retire(route, upstream)
        self._current = staged.chosen

    def __len__(self) -> int:
        """Clients open: the running ones and those still draining."""
        return len(self._current) + len(self._retiring)

    # ------------------------------------------------------------ use

    def use(self, route: Route) -> Use:
        """`async with pool.use(route) as upstream:` the client of this exact route value,
        held (not closed) until the block ends."""
        return Use(self, route)

    async def hold(self, route: Route) -> Upstream:
        """What `use` does on entry, for a caller that releases with `let_go` (a request
        handler: no context-manager object per request)."""
        upstream = self._running(route)
        if upstream is None:
            upstream = await self._get(route)
        upstream.acquire()
        return upstream

    def let_go(self, upstream: Upstream) -> None:
        upstream.release()
        if not upstream.users:
            self._released(upstream)

    def _running(self, route: Route) -> Upstream | None:
        entry = self._current.get(route.name)
        if entry is not None and (entry[0] is route or entry[0] == route):
            return entry[1]
        return None

    def _find(self, route: Route) -> Upstream | None:
        found = self._running(route)
        if found is not None:
            return found
        for old_route, upstream in self._retiring.values():
            if old_route == route:
                return upstream
        return None

    async def _get(self, route: Route) -> Upstream:
        found = self._find(route)
        if found is not None:
            return found

        async def start_late() -> Upstream:
            # A request of an older config reached its handler after that config's
            # client was closed: serve it with a client of its own route, closed after.
            upstream = self._make(route)
            await upstream.start()
            self._retiring[id(upstream)] = (route, upstream)
            return upstream

        upstream, _ = await self._late.call(route, start_late)
        return upstream

    def _released(self, upstream: Upstream) -> None:
        key = id(upstream)
        if not upstream.users and key in self._retiring and key not in self._closing:
            self._retire(*self._retiring[key])

    def _retire(self, route: Route, upstream: Upstream) -> None:
        key = id(upstream)
        self._retiring[key] = (route, upstream)
        if key in self._closing:
            return

        async def close_when_drained() -> None:
            await upstream.drained()
            self._retiring.pop(key, None)  # no new user can find it from here on
            await upstream.close()
            log.debug("closed the replaced client of route %s", route.name)

        task = asyncio.get_running_loop().create_task(close_when_drained(),
                                                      name=f"retire {route.name}")
        self._closing[key] = task
        task.add_done_callback(lambda _t: self._closing.pop(key, None))

    async def close(self) -> None:
        """The app stops: every client, drained or not (flights were cancelled first)."""
        for task in list(self._closing.values()):
            task.cancel()
        await asyncio.gather(*self._closing.values(), return_exceptions=True)
        await self._late.close()
        upstreams = {id(u): u for _r, u in [*self._current.values(), *self._retiring.values()]}
        self._current, self._retiring = {}, {}
        await asyncio.gather(*(u.close() for u in upstreams.values()), return_exceptions=True)


class Use:
    """One hold on the client of one route (see `UpstreamPool.use`)."""

    __slots__ = ("_pool", "_route", "_upstream")

    def __init__(self, pool: UpstreamPool, route: Route) -> None:
        self._pool = pool
        self._route = route
        self._upstream: Upstream | None = None

    async def __aenter__(self) -> Upstream:
        self._upstream = await self._pool.hold(self._route)
        return self._upstream

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._upstream is not None
        self._pool.let_go(self._upstream)
