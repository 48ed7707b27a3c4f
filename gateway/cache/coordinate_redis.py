"""Single flight across replicas (`redis:`): per key a lease in Redis, `SET key value NX
PX ttl`, whose value carries a fencing token (INCR) and the leader's internal URL; the
leader's heartbeat extends it (compare-and-extend in Lua) and its release deletes it
(compare-and-delete), so a leader that died loses its lease after `lease_ttl`.

Over the coordinator of this host (workers: lock files; else in-process): one process
per replica claims the Redis lease. If Redis cannot be reached, this host's coordinator
decides alone (each replica fetches for itself, bytes verified as always) and Redis is
tried again a second later. Moves no blob bytes (replica_source.py follows a leader).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
import redis.exceptions
from yarl import URL

from ..config.redis import RedisSettings
from ..metrics import Metrics
from .coordinate import Coordinator, Follow, Lead
from .replica_auth import FLIGHT_PATH, HEADER, sign, verify

log = logging.getLogger("gateway.cache.redis")
REDIS_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
RETRY = 1.0  # seconds without Redis after it failed, before it is tried again
TURN_POLL = 0.02

# Only the holder (by its value) may extend or delete a lease.
_EXTEND = """if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"""
_DELETE = """if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1]) else return 0 end"""


@dataclass(frozen=True, slots=True)
class Holder:
    """A lease's value: who leads a key, and where other replicas read its bytes."""

    token: int  # the fencing token: grows with every lease (INCR; while Redis keeps it)
    url: str  # the leader's base URL for the internal endpoint

    def encode(self) -> str:
        return json.dumps({"t": self.token, "u": self.url}, separators=(",", ":"))

    @staticmethod
    def decode(raw: bytes | str | None) -> Holder | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return Holder(int(data["t"]), str(data["u"]))
        except (ValueError, KeyError, TypeError):
            return None


class RedisCoordinator:
    """Implements Coordinator across replicas; `inner` coordinates this host's processes."""

    def __init__(self, settings: RedisSettings, inner: Coordinator, advertise: URL,
                 metrics: Metrics) -> None:
        assert settings.url is not None
        self.claims = metrics.replica_claims
        self.settings = settings
        self.inner = inner
        self.advertise = str(advertise).rstrip("/")
        self.prefix = settings.prefix
        self.ttl_ms = int(settings.lease_ttl * 1000)
        self.client: aioredis.Redis | None = None
        self.session: aiohttp.ClientSession | None = None  # to other replicas
        self._secret = settings.secret.encode() if settings.secret else None
        self._derived = settings.secret is None  # the secret is the one kept in Redis
        self._lost_secret = False  # Redis failed: it may have come back empty
        self._retry_at = 0.0
        self._warned = False
        # Leases this process holds: key -> fencing token (the internal endpoint serves
        # a key only to a follower that names the token of the lease it follows).
        self.held: dict[str, int] = {}

    # ---------------------------------------------------------------- Redis health

    def available(self) -> bool:
        return self.client is not None and time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        """Redis did not answer: coordinate within this host for a while."""
        self._retry_at = time.monotonic() + RETRY
        self._lost_secret = self._derived
        if not self._warned:
            self._warned = True
            log.warning("redis: unreachable (%s): each replica fetches on its own until it "
                        "is back", type(exc).__name__)

    def recovered(self) -> None:
        if self._warned:
            self._warned = False
            log.info("redis: reachable again: single flight across replicas resumes")

    def lease_key(self, key: str) -> str:
        return f"{self.prefix}lease:{hashlib.sha256(key.encode()).hexdigest()[:40]}"

    # ------------------------------------------------------------------ lifecycle

    async def open(self, *, sweep: bool) -> None:
        settings = self.settings
        self.client = aioredis.Redis.from_url(
            str(settings.url), password=settings.password, socket_timeout=1.0,
            socket_connect_timeout=1.0, retry_on_timeout=False)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=2.0, sock_read=max(settings.lease_ttl * 2, 10.0)),
            auto_decompress=False)
        await self.inner.open(sweep=sweep)
        await self.secret()  # now if Redis answers; else at the first signed request

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.client is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.client.aclose()
        await self.inner.close()

    async def secret(self) -> bytes | None:
        """The replicas' shared secret: `redis.secret_*`, or one kept in Redis (made by
        whichever replica asks first)."""
        if (self._secret is None or self._lost_secret) and self.available():
            assert self.client is not None
            name = f"{self.prefix}replica-secret"
            # A Redis that came back empty gets the secret the replicas already use.
            mine = self._secret.decode() if self._secret else secrets.token_hex(32)
            try:
                await self.client.set(name, mine, nx=True)
                value = await self.client.get(name)
                self._lost_secret = False
            except REDIS_ERRORS as exc:
                self.failed(exc)
                return None
            if value is not None:
                self._secret = value if isinstance(value, bytes) else str(value).encode()
        return self._secret

    def verify(self, method: str, path_qs: str, header: str | None) -> bool:
        """Is this request to the internal endpoint signed by a replica?"""
        return verify(self._secret, header, method, path_qs, time.time())

    async def signed(self, path_qs: str) -> dict[str, str] | None:
        secret = await self.secret()
        return {HEADER: sign(secret, "GET", path_qs, time.time())} if secret else None

    # ---------------------------------------------------------------------- leases

    async def _take(self, key: str) -> Holder | None:
        """The lease of `key` if free (ours now), else None. Raises REDIS_ERRORS."""
        assert self.client is not None
        token = int(await self.client.incr(f"{self.prefix}fence"))
        holder = Holder(token, self.advertise)
        if await self.client.set(self.lease_key(key), holder.encode(), nx=True,
                                 px=self.ttl_ms):
            self.held[key] = token
            return holder
        return None

    async def holder(self, key: str) -> Holder | None:
        """Who holds the lease of `key` now. Raises REDIS_ERRORS."""
        assert self.client is not None
        return Holder.decode(await self.client.get(self.lease_key(key)))

    async def extend(self, key: str, holder: Holder) -> bool:
        assert self.client is not None
        return bool(await self.client.eval(_EXTEND, 1, self.lease_key(key), holder.encode(),
                                           self.ttl_ms))

    async def let_go(self, key: str, holder: Holder) -> None:
        if self.held.get(key) == holder.token:
            del self.held[key]
        if self.client is None:
            return
        try:
            await self.client.eval(_DELETE, 1, self.lease_key(key), holder.encode())
        except REDIS_ERRORS as exc:  # it expires by itself
            self.failed(exc)

    async def acquire(self, key: str) -> tuple[Holder | None, Holder | None]:
        """(ours, None) if we lead now, (None, theirs) if another replica does, (None,
        None) if Redis failed. Retries while a lease vanishes between SET and GET."""
        for _ in range(5):
            try:
                ours = await self._take(key)
                if ours is not None:
                    self.recovered()
                    return ours, None
                theirs = await self.holder(key)
            except REDIS_ERRORS as exc:
                self.failed(exc)
                return None, None
            if theirs is not None:
                self.recovered()
                return None, theirs
        return None, None

    async def claim(self, key: str) -> Lead | Follow:
        local = await self.inner.claim(key)
        if isinstance(local, Follow):
            return local  # another process of this host leads: as without Redis
        ours, theirs = await self.acquire(key) if self.available() else (None, None)
        if ours is None and theirs is None:  # no Redis: this host decides alone
            self.claims.labels("local").inc()
            return local
        from .replica_source import ReplicaLead  # it builds on this module

        holder = ours if ours is not None else theirs
        assert holder is not None
        lead = ReplicaLead(self, key, local, holder, leading=ours is not None)
        self.claims.labels("lead" if ours is not None else "follow").inc()
        if ours is not None:
            lead.start_heartbeat()
        return lead

    def flight_url(self, holder: Holder, namespace: str, digest: str) -> tuple[str, str]:
        """The leader's internal URL for a blob, and the path the signature covers."""
        path_qs = str(URL(f"{FLIGHT_PATH}{digest}").with_query(ns=namespace,
                                                               fence=str(holder.token)))
        return holder.url + path_qs, path_qs

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[bool]:
        async with self.inner.turn(key) as waited_here:
            holder = await self._turn_lease(key)
            try:
                yield waited_here or (holder is not None and holder[1])
            finally:
                if holder is not None:
                    await self.let_go(key, holder[0])

    async def _turn_lease(self, key: str) -> tuple[Holder, bool] | None:
        """Hold `key` across replicas (True: another held it first); None without Redis.
        A holder that never lets go is waited for at most one lease time."""
        if not self.available():
            return None
        deadline = time.monotonic() + self.settings.lease_ttl
        waited = False
        try:
            while True:
                ours = await self._take(key)
                if ours is not None:
                    self.recovered()
                    return ours, waited
                waited = True
                if time.monotonic() > deadline:
                    return None
                await asyncio.sleep(TURN_POLL)
        except REDIS_ERRORS as exc:
            self.failed(exc)
            return None


class HeldLease:
    """A lease this process holds: extended every `heartbeat` seconds until released."""

    def __init__(self, coordinator: RedisCoordinator, key: str, holder: Holder) -> None:
        self.coordinator = coordinator
        self.key = key
        self.holder = holder
        self._task: asyncio.Task[None] | None = None  # owned: cancelled by release()

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name=f"lease {self.key}")

    async def _beat(self) -> None:
        coordinator = self.coordinator
        while True:
            await asyncio.sleep(coordinator.settings.heartbeat)
            try:
                if not await coordinator.extend(self.key, self.holder):
                    log.warning("redis: the lease of %s was lost (expired or taken over); "
                                "finishing the transfer anyway", self.key)
                    return
            except REDIS_ERRORS as exc:
                coordinator.failed(exc)

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        await self.coordinator.let_go(self.key, self.holder)
