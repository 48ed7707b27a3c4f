"""One upstream call over a route's upstream URLs: each behind its circuit breaker, tried
in order on connect errors, timeouts and 5xx, in rounds retried with backoff while the
call's time budget lasts. A 4xx is the answer (never another URL, never again).

Owns no session and sends nothing itself: the caller's `attempt` sends one request to one
URL (auth and redirects included); this module decides where and whether to send it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from ..config import UpstreamSettings
from ..errors import UpstreamError
from ..metrics import Metrics
from .breaker import Breaker, State
from .retry import IDEMPOTENT, Backoff, Verdict, error_verdict, retry_after, status_verdict

Response = aiohttp.ClientResponse
StatusError = Callable[[int, Mapping[str, str]], UpstreamError]


@dataclass(frozen=True, eq=False)
class Endpoint:
    """One upstream URL of a route, with its breaker. Only the primary gets credentials."""

    url: URL
    primary: bool
    breaker: Breaker

    @property
    def label(self) -> str:  # a metrics label: registry URLs hold no credentials
        return str(self.url)


@dataclass(frozen=True)
class _Failed:
    error: UpstreamError
    verdict: Verdict | None  # None: nothing was tried (every breaker open)
    headers: Mapping[str, str]


class Failover:
    def __init__(self, name: str, settings: UpstreamSettings, metrics: Metrics,
                 clock: Callable[[], float], *, rand: Callable[[], float] = random.random,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.name = name
        self._metrics = metrics
        self._retries = settings.retries
        self._backoff = Backoff(settings.retries.backoff, settings.retries.max_backoff, rand)
        self._sleep = sleep
        self.endpoints = tuple(self._endpoint(url, i == 0, settings, clock)
                               for i, url in enumerate((settings.url, *settings.fallbacks)))

    def _endpoint(self, url: URL, primary: bool, settings: UpstreamSettings,
                  clock: Callable[[], float]) -> Endpoint:
        gauge = self._metrics.breaker_state.labels(self.name, str(url))
        opens = self._metrics.breaker_opens.labels(self.name, str(url))
        gauge.set(State.CLOSED)

        def changed(state: State) -> None:
            gauge.set(state)
            if state is State.OPEN:
                opens.inc()

        breaker = Breaker(settings.breaker.failures, settings.breaker.cooldown, clock,
                          on_change=changed)
        return Endpoint(url, primary, breaker)

    async def call(self, method: str, budget: float,
                   attempt: Callable[[Endpoint], Awaitable[Response]],
                   status_error: StatusError, timeout_error: Callable[[], UpstreamError],
                   ) -> Response:
        """The first 2xx (or redirect-free) answer, within `budget` seconds in all; else
        the last failure as an UpstreamError (a 4xx at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        rounds = self._retries.attempts if method in IDEMPOTENT else 1
        failed: _Failed | None = None
        for number in range(rounds):
            if number:
                assert failed is not None and failed.verdict is not None
                wait = self._backoff.delay(number - 1)
                if failed.verdict is Verdict.BUSY:
                    wait = max(wait, retry_after(failed.headers))
                if loop.time() + wait >= deadline:
                    break
                self._metrics.retries.labels(self.name, failed.verdict.value).inc()
                await self._sleep(wait)
            outcome = await self._round(deadline, attempt, status_error, timeout_error)
            if not isinstance(outcome, _Failed):
                return outcome
            failed = outcome
            if failed.verdict is None:
                break
        assert failed is not None
        raise failed.error

    async def _round(self, deadline: float, attempt: Callable[[Endpoint], Awaitable[Response]],
                     status_error: StatusError, timeout_error: Callable[[], UpstreamError],
                     ) -> Response | _Failed:
        """Each URL once, in order, until one answers; a 429 ends the round (no fallback)."""
        failed: _Failed | None = None
        for index, endpoint in enumerate(self.endpoints):
            if not endpoint.breaker.allow():
                continue
            if index:
                self._metrics.fallbacks.labels(self.name, endpoint.label).inc()
            outcome = await self._attempt(endpoint, deadline, attempt, status_error,
                                          timeout_error)
            if not isinstance(outcome, _Failed):
                return outcome
            failed = outcome
            if failed.verdict is Verdict.BUSY:
                break
        return failed or _Failed(self._skipped(), None, {})

    async def _attempt(self, endpoint: Endpoint, deadline: float,
                       attempt: Callable[[Endpoint], Awaitable[Response]],
                       status_error: StatusError, timeout_error: Callable[[], UpstreamError],
                       ) -> Response | _Failed:
        breaker = endpoint.breaker
        try:
            async with asyncio.timeout_at(deadline):
                resp = await attempt(endpoint)
        except UpstreamError as exc:
            verdict = error_verdict(exc)
            if verdict is Verdict.FINAL:
                breaker.success()  # it answered, if only to refuse
                raise
            breaker.failure()
            return _Failed(exc, verdict, exc.headers)
        except TimeoutError:
            breaker.failure()
            return _Failed(timeout_error(), Verdict.DOWN, {})
        except BaseException:
            breaker.abandon()
            raise
        if resp.status < 300:
            breaker.success()
            return resp
        resp.release()
        verdict = status_verdict(resp.status, resp.headers)
        error = status_error(resp.status, resp.headers)
        if verdict is Verdict.DOWN:
            breaker.failure()
            return _Failed(error, verdict, resp.headers)
        breaker.success()
        if verdict is Verdict.BUSY:
            return _Failed(error, verdict, resp.headers)
        raise error

    def _skipped(self) -> UpstreamError:
        wait = min(e.breaker.retry_in() for e in self.endpoints)
        return UpstreamError(
            "UNAVAILABLE", f"upstream {self.name} is failing and skipped for now "
            f"(circuit breaker open; next try in {math.ceil(wait)}s)", 502, retryable=True,
            headers={"Retry-After": str(max(1, math.ceil(wait)))})
