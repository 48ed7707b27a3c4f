"""A route's pool of upstream accounts: which one a pull goes out as, which are out of
pulls until their window resets, and when the whole upstream asked to be left alone.

Reads answers only through ratelimit.py and reports through metrics and the log; an
account is named by its username (or "anonymous"), never by anything secret.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cachetools import LRUCache

from ..config import Credentials
from ..errors import UpstreamError
from ..metrics import Metrics
from .ratelimit import (
    DEFAULT_WAIT,
    Kind,
    Quota,
    kind_of_429,
    parse_quota,
    retry_after,
    seconds_header,
)

log = logging.getLogger("gateway.upstream")

ANONYMOUS = "anonymous"


@dataclass(eq=False)
class Account:
    index: int
    name: str  # the username, or "anonymous": for metrics and logs
    credentials: Credentials | None
    remaining: int | None = None  # pulls left, as last said (less the pulls sent since)
    known_until: float = 0.0  # `remaining` says nothing past its window
    out_until: float = 0.0  # a pull-limit 429: no pulls as this account before then
    chosen: int = 0  # when it last took a pull (a turn number): ties go to the longest idle
    source: str | None = None  # the docker-ratelimit-source last seen


class AccountPool:
    """The accounts of one route, in the order written (one anonymous one without any).

    A pull (a manifest GET: what Docker Hub counts) goes to the usable account with the
    most pulls left: it follows what the upstream says about each account (other clients
    may spend the same accounts; a Personal account has more than an anonymous IP), and
    when nothing is known, or all are equal, it is round robin, since ties go to the
    account idle longest. An account never heard from counts as having the most left,
    so each is tried once before the numbers decide.
    """

    def __init__(self, route: str, pool: tuple[Credentials, ...], metrics: Metrics,
                 clock: Callable[[], float]) -> None:
        self.route = route
        self.accounts = [Account(i, c.username, c) for i, c in enumerate(pool)] or [
            Account(0, ANONYMOUS, None)]
        self._metrics = metrics
        self._clock = clock
        # The account a repository's manifest was pulled as: its blobs and HEADs reuse
        # the token (Docker Hub counts neither, so any account would do).
        self._by_repository: LRUCache[str, Account] = LRUCache(maxsize=4096)
        self._backoff_until = 0.0
        self._turns = itertools.count(1)

    # ------------------------------------------------------------ choosing

    def for_pull(self, repository: str | None) -> Account:
        """The account to send a manifest GET as; raises a 429 when none may pull."""
        self._check_backoff()
        now = self._clock()
        usable = [a for a in self.accounts if a.out_until <= now]
        if not usable:
            wait = min(a.out_until for a in self.accounts) - now
            raise _too_many(f"every account of upstream {self.route} is out of pulls",
                            wait)
        account = max(usable, key=lambda a: (self._left(a, now), -a.chosen))
        account.chosen = next(self._turns)
        if account.remaining is not None:  # until its answer says how many are left
            account.remaining = max(account.remaining - 1, 0)
        self._metrics.account_pulls.labels(self.route, account.name).inc()
        if repository:
            self._by_repository[repository] = account
        return account

    @staticmethod
    def _left(account: Account, now: float) -> float:
        """Pulls left as far as known; unknown (never said, or said in a window now over,
        or before a skip that has ended) counts as the most."""
        if account.remaining is None or now >= account.known_until or (
                account.out_until and account.out_until <= now):
            return math.inf
        return account.remaining

    def for_other(self, repository: str | None) -> Account:
        """The account for a HEAD, a blob, a tag list: not counted as pulls, so any does;
        the one the repository's manifest went out as, if it still may pull."""
        self._check_backoff()
        now = self._clock()
        account = self._by_repository.get(repository) if repository else None
        if account is not None and account.out_until <= now:
            return account
        return next((a for a in self.accounts if a.out_until <= now), account or
                    self.accounts[0])

    def _check_backoff(self) -> None:
        wait = self._backoff_until - self._clock()
        if wait > 0:
            raise _too_many(f"upstream {self.route} is rate-limiting the gateway", wait)

    # ------------------------------------------------------------ learning

    def observe(self, account: Account, status: int, headers: Mapping[str, str]) -> Kind | None:
        """Learn from one answer sent as `account`; for a 429, which kind it was."""
        now = self._clock()
        quota = parse_quota(headers)
        if quota is not None:
            self._record(account, quota, now)
        if status != 429:
            return None
        kind = kind_of_429(quota)
        wait = retry_after(headers, now)
        if kind == "pull_limit":
            assert quota is not None
            # At least a second, so that the account is really skipped for the next try.
            wait = max(wait if wait is not None else quota.window or DEFAULT_WAIT, 1.0)
            account.out_until = now + wait
            self._metrics.account_out_until.labels(self.route, account.name).set(
                account.out_until)
            log.warning("upstream %s: account %s is out of pulls (%s per %s s); pulls go "
                        "as the other accounts for %s s", self.route, account.name,
                        quota.limit, _whole(quota.window), seconds_header(wait))
        else:
            wait = max(wait if wait is not None else DEFAULT_WAIT, 1.0)
            self._backoff_until = max(self._backoff_until, now + wait)
            self._metrics.upstream_backoff_until.labels(self.route).set(self._backoff_until)
            log.warning("upstream %s answered 429 without rate-limit headers (an abuse "
                        "limit, not account %s's pull quota): no requests to it for %s s",
                        self.route, account.name, seconds_header(wait))
        self._metrics.rate_limited.labels(self.route, account.name, kind).inc()
        return kind

    def _record(self, account: Account, quota: Quota, now: float) -> None:
        m, labels = self._metrics, (self.route, account.name)
        if quota.limit is not None:
            m.ratelimit_limit.labels(*labels).set(quota.limit)
        if quota.window is not None:
            m.ratelimit_window.labels(*labels).set(quota.window)
        if quota.remaining is not None:
            account.remaining = quota.remaining
            account.known_until = now + (quota.window or DEFAULT_WAIT)
            m.ratelimit_remaining.labels(*labels).set(quota.remaining)
            if quota.remaining > 0 and account.out_until > now:  # its window moved on
                account.out_until = 0.0
                m.account_out_until.labels(*labels).set(0)
        if quota.source is not None and quota.source != account.source:
            if account.source is not None:
                m.ratelimit_source.remove(*labels, account.source)
            account.source = quota.source
            m.ratelimit_source.labels(*labels, quota.source).set(1)


def _too_many(what: str, wait: float) -> UpstreamError:
    retry = seconds_header(wait)
    return UpstreamError("TOOMANYREQUESTS", f"{what}; retry after {retry}s", 429,
                         retryable=True, upstream_status=429, headers={"Retry-After": retry})


def _whole(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:g}"
