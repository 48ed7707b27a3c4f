"""One replica's claim on a blob another replica may be fetching (`redis:`): a `Lead` for
this host whose bytes come from the leading replica's internal endpoint (Range from the
offset reached, growing until the leader verified), or from the upstream once this
replica leads, at the start or by taking over the lease of a leader that died.

Decides nothing about the bytes: the flight hashes and verifies them as from any
upstream, so a leader that sends wrong bytes gets nothing wrong served or kept here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from ..errors import UpstreamError
from .coordinate import Lead, Published
from .coordinate_redis import REDIS_ERRORS, HeldLease, Holder, RedisCoordinator
from .transfer import Opener

log = logging.getLogger("gateway.cache.redis")
POLL = 0.05  # seconds between looks at a lease whose leader does not answer


class ReplicaLead:
    """Implements Lead; `leading` False: another replica fetches and this one follows."""

    shared = True

    def __init__(self, coordinator: RedisCoordinator, key: str, local: Lead, holder: Holder,
                 *, leading: bool) -> None:
        self.coordinator = coordinator
        self.key = key
        self.local = local  # this host's lead: its other workers follow our spool
        self.holder = holder  # the lease followed, or ours
        self.leading = leading
        self.lease: HeldLease | None = None
        self.took_over = False

    def start_heartbeat(self) -> None:
        self.lease = HeldLease(self.coordinator, self.key, self.holder)
        self.lease.start()

    def publish(self, transfer: Published) -> None:
        self.local.publish(transfer)

    async def release(self) -> None:
        if self.lease is not None:
            await self.lease.release()
            self.lease = None
        await self.local.release()

    def source(self, namespace: str, digest: str, upstream: Opener,
               on_takeover: Callable[[], None]) -> Opener:
        """The opener of this blob's bytes for a follower: the leader's, until this
        replica leads (`on_takeover()` is called then, once); then `upstream`."""

        async def open_bytes(headers: dict[str, str]) -> aiohttp.ClientResponse:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.coordinator.settings.lease_ttl * 2 + 5
            while not self.leading:
                resp = await self._from_leader(namespace, digest, headers)
                if resp is not None:
                    return resp
                await self._look_again()
                if self.leading:
                    self.took_over = True
                    self.coordinator.claims.labels("takeover").inc()
                    log.info("redis: took over the fetch of %s from a replica that stopped",
                             digest)
                    on_takeover()
                    break
                if loop.time() > deadline:
                    raise UpstreamError("UNAVAILABLE", "the replica fetching this blob "
                                        "stopped answering", 502, retryable=True)
                await asyncio.sleep(POLL)
            return await upstream(headers)

        return open_bytes

    async def _from_leader(self, namespace: str, digest: str,
                           headers: dict[str, str]) -> aiohttp.ClientResponse | None:
        """The leader's answer with the bytes asked for, or None (gone, not serving)."""
        coordinator = self.coordinator
        assert coordinator.session is not None
        url, path_qs = coordinator.flight_url(self.holder, namespace, digest)
        auth = await coordinator.signed(path_qs)
        if auth is None:
            return None
        try:
            # A new connection each time: with workers behind one port (SO_REUSEPORT),
            # a retry must be able to reach the worker that leads.
            resp = await coordinator.session.get(
                url, headers={**headers, **auth, "Connection": "close"},
                allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        if resp.status in (200, 206):
            return resp
        resp.release()
        return None

    async def _look_again(self) -> None:
        """The leader did not answer: follow whoever holds the lease now, or take it."""
        coordinator = self.coordinator
        try:
            holder = await coordinator.holder(self.key)
            if holder is None:
                ours, holder = await coordinator.acquire(self.key)
                if ours is not None:
                    self.holder, self.leading = ours, True
                    self.start_heartbeat()
                    return
        except REDIS_ERRORS as exc:
            # No Redis and no leader: this replica fetches it itself (verified as always).
            coordinator.failed(exc)
            self.leading = True
            return
        if holder is None:  # Redis failed in acquire()
            self.leading = True
        elif holder != self.holder:
            self.holder = holder
