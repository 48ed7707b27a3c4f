"""What the cache does when its disk (or quota) is full, ENOSPC or EDQUOT: ask the evictor for
room and retry once, else serve without keeping (blobs are relayed from the upstream for a
while); each event is counted and logged once.

Decides nothing about what to evict (the `make_room` hook does) and never serves a byte.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import aiohttp

from ..errors import RegistryError
from ..metrics import Metrics
from ..reference import Digest
from ..upstream import Upstream
from .relay import Relay
from .transfer import Opener, Pace

log = logging.getLogger("gateway.cache")

T = TypeVar("T")
What = Literal["blob", "manifest", "tag"]
MakeRoom = Callable[[int], Awaitable[bool]]
RELAY_SECONDS = 30.0  # after a blob could not be spooled, new blob GETs skip the spool
_FULL = {errno.ENOSPC, errno.EDQUOT}


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


class NoSpace(RegistryError):
    """A blob could not be kept: no space, and none could be made. Readers of its flight
    go on from the upstream; it reaches a client as an error only if something is wrong."""

    def __init__(self, cause: OSError, doing: str) -> None:
        name = errno.errorcode.get(cause.errno or 0, "ENOSPC")
        super().__init__("UNAVAILABLE", f"the gateway's disk is full ({name}) while {doing}",
                         503)
        self.cause = cause


async def no_room(bytes_needed: int) -> bool:
    """The default hook: nothing can be freed (no evictor)."""
    return False


class DiskFull:
    """The disk-full policy of one cache (one data directory).

    `make_room(bytes_needed) -> Awaitable[bool]` is the evictor's hook: free at least
    that many bytes if it can, and say whether it freed anything. It is called at most
    once per ENOSPC/EDQUOT event, before the one retry.
    """

    def __init__(self, metrics: Metrics, clock: Callable[[], float], *,
                 relay_seconds: float = RELAY_SECONDS) -> None:
        self.metrics = metrics
        self.make_room: MakeRoom = no_room
        self._clock = clock
        self._relay_seconds = relay_seconds
        self._relay_until = -math.inf

    # ---------------------------------------------------------- the relay window

    @property
    def relay_seconds(self) -> float:
        return self._relay_seconds

    def relaying(self) -> bool:
        """True for a while after a blob could not be spooled: a new GET of an uncached
        blob is then relayed straight from the upstream instead of starting a spool that
        would fail again."""
        return self._clock() < self._relay_until

    def clear(self) -> None:
        """Room was made (the evictor may call this): spool new blobs again at once."""
        self._relay_until = -math.inf

    def relay(self, upstream: Upstream, route: str, repository: str, digest: Digest) -> Relay:
        """A GET of a blob relayed from the upstream, without a spool."""
        return self.relay_for(route, digest, blob_opener(upstream, repository, digest),
                              pace=upstream.pace)

    def relay_for(self, route: str, digest: Digest, open_upstream: Opener, *,
                  size: int | None = None, prefix_fd: int = -1, prefix_len: int = 0,
                  pace: Pace | None = None) -> Relay:
        """A relay of one blob for one client (see Relay), counted; its upstream bytes and
        integrity failures count for `route`."""
        self.metrics.disk_full_relays.labels(route).inc()

        def integrity_failed() -> None:
            self.metrics.integrity_failures.labels(route, "blob").inc()

        return Relay(digest, open_upstream, size=size, prefix_fd=prefix_fd,
                     prefix_len=prefix_len, pace=pace,
                     on_bytes=self.metrics.upstream_bytes.labels(route).inc,
                     on_integrity_failure=integrity_failed)

    # ---------------------------------------------------------- events

    async def recover(self, first: OSError, again: Callable[[], Awaitable[T]], *,
                      needed: int, route: str, doing: str, giving_up: str) -> T:
        """After a write for a blob's spool failed with `first` (ENOSPC or EDQUOT): ask
        `make_room(needed)` and, if room was made, return `again()`. If there is still no
        room: count and log the event (`giving_up` says what happens instead), relay new
        blob GETs for a while, and raise NoSpace. Any other error passes through."""
        made = await self._ask(needed)
        if made:
            try:
                result = await again()
            except OSError as exc:
                if not is_no_space(exc):
                    raise
            else:
                self.event(route, "blob", first, doing,
                           f"the evictor made room for {needed} bytes; retried")
                return result
        self.event(route, "blob", first, doing,
                   ("the evictor made room but the retry failed too; " if made else "")
                   + giving_up)
        self._relay_until = self._clock() + self._relay_seconds
        raise NoSpace(first, doing)

    async def _ask(self, needed: int) -> bool:
        try:
            return await self.make_room(needed)
        except Exception:  # an evictor's bug must not cost the client its blob
            log.exception("make_room(%d) failed", needed)
            return False

    def event(self, route: str, what: What, exc: OSError, doing: str, outcome: str) -> None:
        """Count one disk-full event and log its one line."""
        self.metrics.disk_full.labels(route, what).inc()
        name = errno.errorcode.get(exc.errno or 0, "ENOSPC")
        log.warning("disk full (%s: %s) while %s, route %s: %s", name, exc.strerror, doing, route,
                    outcome)


def blob_opener(upstream: Upstream, repository: str, digest: Digest) -> Opener:
    path = f"/v2/{repository}/blobs/{digest}"

    async def open_upstream(headers: dict[str, str]) -> aiohttp.ClientResponse:
        return await upstream.request("GET", path, kind="blob", repository=repository,
                                      headers=headers)

    return open_upstream
