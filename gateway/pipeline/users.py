"""Logins: an htpasswd file of bcrypt hashes, read off the event loop and re-read when it
changes, and the password check, which is slow by design (~100 ms a try).

bcrypt runs in threads, a few at a time, and a good answer is remembered (keyed by an
HMAC of user, password and stored hash under a per-process key), so a pull of 30 requests
costs one check. Never logs, returns or keeps a password or a hash in the clear.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import bcrypt
from cachetools import TTLCache

from ..errors import RegistryError
from ..singleflight import SharedCalls

log = logging.getLogger("gateway.users")

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_LENGTH = 60
_BCRYPT_MAX_PASSWORD = 72  # bcrypt reads no further; htpasswd and Apache cut there too
CHECK_INTERVAL = 2.0  # seconds between looks at the file's mtime and size


@dataclass(frozen=True)
class Table:
    """The logins of one htpasswd file: user -> bcrypt hash (bytes)."""

    hashes: dict[str, bytes] = field(default_factory=dict, repr=False)
    problems: tuple[str, ...] = ()  # "users.htpasswd:3: ..." (never a hash)
    # A hash of the file's cost for unknown users: the answer takes as long either way,
    # so response times do not tell which user names exist.
    decoy: bytes = field(default=b"", repr=False)


def parse_htpasswd(text: str, source: str) -> Table:
    """`user:hash` lines (bcrypt only: `htpasswd -B`); blank lines and `#` comments are
    skipped. A bad line is skipped and reported by number (the first entry of a user
    wins, as in Apache)."""
    hashes: dict[str, bytes] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, stored = line.partition(":")
        where = f"{source}:{number}"
        if not colon or not user:
            problems.append(f"{where}: not a user:hash line")
        elif not stored.startswith(_BCRYPT_PREFIXES) or len(stored) != _BCRYPT_LENGTH:
            problems.append(f"{where}: user {user[:64]!r}: not a bcrypt hash "
                            "(make it with htpasswd -B)")
        elif user in hashes:
            problems.append(f"{where}: user {user[:64]!r} is listed twice; the first counts")
        else:
            hashes[user] = stored.encode()
    return Table(hashes, tuple(problems))


def _cost(stored: bytes) -> int:
    try:
        return max(4, min(int(stored[4:6]), 14))
    except ValueError:
        return 10


def _read_table(path: str) -> tuple[tuple[int, int, int], Table]:
    """(identity of the file as read, its table): runs in a thread."""
    with open(path, encoding="utf-8", errors="replace") as file:
        stat = os.fstat(file.fileno())
        text = file.read()
    table = parse_htpasswd(text, path)
    first = next(iter(table.hashes.values()), b"$2b$10$")
    decoy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(_cost(first)))
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino), \
        Table(table.hashes, table.problems, decoy)


def _identity(path: str) -> tuple[int, int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _checkpw(password: bytes, stored: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], stored)
    except ValueError:  # a hash bcrypt cannot read
        return False


class Htpasswd:
    """One htpasswd file. `refresh()` reads it again if it changed (in a thread); before a
    check it is looked at every `CHECK_INTERVAL` seconds. A file that cannot be read keeps
    the table last read (none at first: every login then fails)."""

    def __init__(self, path: str, *, interval: float = CHECK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._interval = interval
        self._clock = clock
        self._identity: tuple[int, int, int] | None = None
        self._table = Table()
        self._next_look = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self, *, due_only: bool = False) -> None:
        """Read the file again now if its mtime, size or inode changed (`due_only`: only
        if the interval has passed: requests waiting on another's look do not look again)."""
        async with self._lock:
            if due_only and self._clock() < self._next_look:
                return
            self._next_look = self._clock() + self._interval
            try:
                if self._identity is not None and \
                        await asyncio.to_thread(_identity, self.path) == self._identity:
                    return
                self._identity, self._table = await asyncio.to_thread(_read_table, self.path)
            except OSError as exc:
                log.error("cannot read the htpasswd file %s (%s): %s", self.path,
                          exc.strerror or type(exc).__name__, "keeping the users read before"
                          if self._identity else "no login succeeds until it can be read")
                return
            for problem in self._table.problems:
                log.warning("%s (line skipped)", problem)
            log.info("read %d users from %s", len(self._table.hashes), self.path)

    async def table(self) -> Table:
        # While a look is in progress, wait for it: the first requests need the first read.
        if self._clock() >= self._next_look or self._lock.locked():
            await self.refresh(due_only=True)
        return self._table


class Logins:
    """The htpasswd file in use and the checks of passwords against it. Built once per
    process (a reload keeps the cache and the bound on concurrent checks): `checks`
    bcrypt runs at a time, at most `waiting` more queued; beyond that a login is
    answered 429, so failed logins cannot take every core."""

    def __init__(self, *, checks: int = 2, waiting: int = 32, cache_size: int = 4096,
                 remember: float = 600.0, remember_failure: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._files: dict[str, Htpasswd] = {}
        self._checks = asyncio.Semaphore(checks)
        self._capacity = checks + waiting
        self._pending = 0
        self._key = secrets.token_bytes(32)
        # A wrong password is remembered briefly too: a client retrying it costs nothing.
        self._good: TTLCache[bytes, bool] = TTLCache(cache_size, remember, timer=clock)
        self._bad: TTLCache[bytes, bool] = TTLCache(cache_size, remember_failure, timer=clock)
        # The parallel first requests of a pull share one check.
        self._calls: SharedCalls[bytes, bool] = SharedCalls("bcrypt")

    def file(self, path: str) -> Htpasswd:
        found = self._files.get(path)
        if found is None:
            # One file is in use at a time: a reload that names another drops the old one.
            self._files = {path: (found := Htpasswd(path, clock=self._clock))}
        return found

    async def refresh(self) -> None:
        """Re-read every htpasswd file in use that changed: the reload hook."""
        for htpasswd in list(self._files.values()):
            await htpasswd.refresh()

    async def verify(self, path: str, user: str, password: bytes) -> bool:
        table = await self.file(path).table()
        stored = table.hashes.get(user)
        key = hmac.new(self._key, b"".join(len(part).to_bytes(4, "big") + part for part in (
            user.encode(), password, stored or b"?")), hashlib.sha256).digest()
        if key in self._good:
            return True
        if key in self._bad:
            return False
        good, _ = await self._calls.call(key, lambda: self._check(key, password, stored,
                                                                  table.decoy))
        return good

    async def _check(self, key: bytes, password: bytes, stored: bytes | None,
                     decoy: bytes) -> bool:
        if self._pending >= self._capacity:
            raise RegistryError("TOOMANYREQUESTS", "too many logins are being checked; "
                                "retry in a moment", 429, headers={"Retry-After": "1"})
        self._pending += 1
        try:
            async with self._checks:
                good = await asyncio.to_thread(_checkpw, password, stored or decoy)
        finally:
            self._pending -= 1
        good = good and stored is not None
        (self._good if good else self._bad)[key] = True
        return good
