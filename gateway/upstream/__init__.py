"""Talking to one upstream registry: auth challenge → token, credentials, proxy, redirects,
over the route's upstream URLs (failover.py: fallbacks, breakers, retries, time budgets).

One `aiohttp.ClientSession` per route. Every failure is translated here, in one
table, into an `UpstreamError` a client can read; tokens and passwords never leave
this package (not in errors, logs or metrics). Which account a request goes out as is
accounts.py's choice; how connections leave the machine is connect.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from cachetools import TLRUCache
from multidict import CIMultiDict
from yarl import URL

from ..config import Route
from ..errors import UpstreamError
from ..metrics import Metrics
from ..singleflight import SharedCalls
from .accounts import ANONYMOUS, Account, AccountPool
from .challenge import Challenge, Token, challenge_scope, parse_challenge
from .connect import TIMEOUTS, TRANSPORT_ERRORS, Outbound, outbound
from .failover import Endpoint, Failover
from .users import Users

_REDIRECTS = (301, 302, 303, 307, 308)
_DRAIN = 64 << 10  # an error body this small is read whole: its connection is kept
_MAX_REDIRECTS = 5
# 404 means different things per endpoint (spec, "Error Codes").
_NOT_FOUND = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN", "tags": "NAME_UNKNOWN",
              "referrers": "MANIFEST_UNKNOWN", "ping": "NOT_FOUND"}


class Upstream(Users):
    """The client side of one route. `request` returns a 2xx/3xx-free response or raises."""

    def __init__(self, route: Route, metrics: Metrics, *, read_timeout: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.route = route
        self.name = route.name
        self.settings = route.upstream
        self._metrics = metrics
        timeouts = route.upstream.timeouts
        # `read_timeout` (tests) stands for both the headers and the stall timeout.
        self._headers_timeout = read_timeout or timeouts.headers
        self._stall_timeout = read_timeout or timeouts.stall
        self._session: aiohttp.ClientSession | None = None
        self.failover = Failover(route.name, route.upstream, metrics, clock)
        self._challenges: dict[URL, Challenge] = {}  # per upstream URL: its own realm
        self._tokens: TLRUCache[str, Token] = TLRUCache(
            maxsize=4096, ttu=lambda _k, tok, now: now + tok.expires_in, timer=clock)
        self._token_calls: SharedCalls[str, str] = SharedCalls("token")
        Users.__init__(self)
        # Awaited for each batch of blob bytes read: the route's upstream bandwidth cap,
        # set by the composition root (None: read as fast as the upstream sends).
        self.pace: Callable[[int], Awaitable[None]] | None = None
        self._pool = AccountPool(route.name, route.upstream.pool, metrics, clock)
        self._fallback_account = Account(-1, ANONYMOUS, None)  # not one of the pool's
        self._outbound: Outbound | None = None

    async def start(self) -> None:
        ssl_context: ssl.SSLContext | bool = True
        if self.settings.ca_file:  # reads a file: off the loop
            ssl_context = await asyncio.to_thread(ssl.create_default_context,
                                                  cafile=self.settings.ca_file)
        self._outbound = outbound(self.settings.proxy, ssl_context)
        connector = self._outbound.connector
        # Per-read timeouts only: a multi-GB layer must not be cut off by a total timeout.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.timeouts.connect,
                                        sock_read=self._stall_timeout)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            headers={"User-Agent": "registry-gateway/0.1", "Accept-Encoding": "identity"},
            trust_env=False,
        )

    async def close(self) -> None:
        await self._token_calls.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    @property
    def outbound(self) -> Outbound:
        assert self._outbound is not None, "Upstream.start() was not awaited"
        return self._outbound

    # ------------------------------------------------------------------ auth

    def _account(self, endpoint: Endpoint, pull: bool, repository: str | None) -> Account:
        """Who a request goes out as: an account of the route's pool for its `upstream:`,
        anonymous for a fallback (the route's credentials go to `upstream:` only)."""
        if not endpoint.primary:
            return self._fallback_account
        return (self._pool.for_pull if pull else self._pool.for_other)(repository)

    async def _token(self, challenge: Challenge, scope: str, rejected: str | None,
                     endpoint: Endpoint, account: Account) -> str:
        """A token for `scope`: cached, or fetched once however many requests ask at once.

        `rejected` is the Authorization the upstream just refused: a cached token other
        than that one was renewed meanwhile and is used as it is.
        """
        # Per upstream URL (a fallback sharing the realm must not get the primary's token)
        # and per account (each has its own token, and its own pulls, for the same scope).
        key = f"{endpoint.url} {account.index} {challenge.realm} {challenge.service} {scope}"
        cached = self._tokens.get(key)
        if cached is not None and f"Bearer {cached.value}" != rejected:
            return cached.value
        value, _started = await self._token_calls.call(
            key, lambda: self._fetch_token(challenge, scope, key, account))
        return value

    async def _fetch_token(self, challenge: Challenge, scope: str, key: str,
                           account: Account) -> str:
        params = {k: v for k, v in (("service", challenge.service), ("scope", scope)) if v}
        headers: CIMultiDict[str] = CIMultiDict()
        credentials = account.credentials
        if credentials is not None:
            headers["Authorization"] = aiohttp.encode_basic_auth(credentials.username,
                                                                 credentials.password)
        try:
            tunnel = self.outbound.login_for(URL(challenge.realm), headers)
            async with self.session.get(challenge.realm, params=params, headers=headers,
                                        proxy=self.outbound.proxy,
                                        proxy_headers=tunnel) as resp:
                if resp.status in (401, 403):
                    raise UpstreamError(
                        "UNAUTHORIZED" if resp.status == 401 else "DENIED",
                        f"upstream {self.name} refused the gateway's credentials "
                        f"for {scope or 'access'}", 502 if resp.status == 401 else 403,
                        retryable=False, upstream_status=resp.status)
                if resp.status != 200:
                    raise self._status_error(resp.status, "token", resp.headers)
                body: Any = await resp.json(content_type=None)
        except TRANSPORT_ERRORS as exc:
            raise self.transport_error(exc, "token") from None
        except ValueError:
            raise UpstreamError("UNAVAILABLE", f"upstream {self.name}: token endpoint "
                                "answered something other than JSON", 502,
                                retryable=True) from None
        value = (body.get("token") or body.get("access_token")) if isinstance(body, dict) \
            else None
        if not isinstance(value, str):
            raise UpstreamError("UNAVAILABLE", f"upstream {self.name}: token endpoint gave "
                                "no token", 502, retryable=True)
        expires_in = body.get("expires_in", 60)
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 60.0
        # Refresh a little early so a token never expires between check and use.
        self._tokens[key] = Token(value, max(lifetime * 0.9 - 5, 1.0))
        return value

    async def _authorization(self, scope: str, endpoint: Endpoint, account: Account,
                             rejected: str | None = None) -> str | None:
        challenge = self._challenges.get(endpoint.url)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = account.credentials
            return aiohttp.encode_basic_auth(creds.username, creds.password) if creds else None
        return "Bearer " + await self._token(challenge, scope, rejected, endpoint, account)

    # --------------------------------------------------------------- requests

    async def request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        repository: str | None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send `method path` upstream with auth and redirects; raise on any non-2xx.

        Tried over the route's upstream URLs with retries (failover.py), within the
        headers timeout (a blob: the stall timeout). The caller owns the returned
        response and must release it.
        """
        scope = f"repository:{repository}:pull" if repository else ""
        budget = self._stall_timeout if kind == "blob" else self._headers_timeout

        async def attempt(endpoint: Endpoint) -> aiohttp.ClientResponse:
            return await self._attempt(endpoint, method, path, kind, repository, scope,
                                       headers, params)

        return await self.failover.call(
            method, budget, attempt,
            lambda status, answer: self._status_error(status, kind, answer),
            lambda: self.transport_error(TimeoutError(), kind))

    async def _attempt(self, endpoint: Endpoint, method: str, path: str, kind: str,
                       repository: str | None, scope: str, headers: Mapping[str, str] | None,
                       params: Mapping[str, str] | None) -> aiohttp.ClientResponse:
        """One request to one upstream URL, as one account (the next one when that
        account's pulls are spent), through its auth dance: any status."""
        pull = method == "GET" and kind == "manifest"  # what Docker Hub counts as a pull
        started = time.monotonic()
        for _turn in range(len(self._pool.accounts) + 1):
            account = self._account(endpoint, pull, repository)
            resp = await self._authorized(endpoint, method, path, kind, headers, params,
                                          scope, account)
            if not endpoint.primary:
                break
            spent = self._pool.observe(account, resp.status, resp.headers) == "pull_limit"
            if not (pull and spent):
                break
            # That account is out until its window resets: the pull goes on as another
            # (for_pull raises a 429 saying when to retry once none is left).
            self._metrics.upstream_requests.labels(self.name, kind, "429").inc()
            resp.release()
        else:
            raise self._status_error(429, kind, resp.headers)
        self._metrics.upstream_seconds.labels(self.name, kind).observe(time.monotonic() - started)
        self._metrics.upstream_requests.labels(self.name, kind, str(resp.status)).inc()
        return resp

    async def _authorized(self, endpoint: Endpoint, method: str, path: str, kind: str,
                          headers: Mapping[str, str] | None, params: Mapping[str, str] | None,
                          scope: str, account: Account) -> aiohttp.ClientResponse:
        """One request as `account`, answering one 401 challenge; any status returned."""
        authorization = await self._authorization(scope, endpoint, account)
        retried_auth = False
        while True:
            resp = await self._send(endpoint.url, method, path, kind, headers, params,
                                    authorization)
            if resp.status != 401 or retried_auth:
                break
            www = resp.headers.get("WWW-Authenticate", "")
            await _drain(resp)
            challenge = parse_challenge(www)
            if challenge is None or (challenge.scheme == "basic"
                                     and account.credentials is None):
                raise UpstreamError(
                    "UNAUTHORIZED", f"upstream {self.name} requires credentials the gateway "
                    "does not have for this repository", 401, retryable=False, upstream_status=401)
            self._challenges[endpoint.url] = challenge
            authorization = await self._authorization(challenge_scope(www) or scope, endpoint,
                                                      account, rejected=authorization)
            retried_auth = True
        return resp

    async def _send(
        self,
        base: URL,
        method: str,
        path: str,
        kind: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        authorization: str | None,
    ) -> aiohttp.ClientResponse:
        url = base.with_path(path)
        if params:
            url = url.with_query(params)
        origin = base.origin()
        # A blob body may pause up to the stall timeout; a small answer up to the headers one.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.settings.timeouts.connect,
            sock_read=self._stall_timeout if kind == "blob" else self._headers_timeout)
        send_headers: CIMultiDict[str] = CIMultiDict(headers or {})
        for _ in range(_MAX_REDIRECTS + 1):
            if authorization and url.origin() == origin:
                send_headers["Authorization"] = authorization
            else:
                # Docker Hub sends blobs to a CDN: its signed URL must not get our token.
                send_headers.pop("Authorization", None)
            try:
                tunnel = self.outbound.login_for(url, send_headers)
                resp = await self.session.request(method, url, headers=send_headers,
                                                  allow_redirects=False, timeout=timeout,
                                                  proxy=self.outbound.proxy,
                                                  proxy_headers=tunnel)
            except TRANSPORT_ERRORS as exc:
                raise self.transport_error(exc, kind) from None
            if resp.status not in _REDIRECTS or "Location" not in resp.headers:
                return resp
            location = URL(resp.headers["Location"])
            resp.release()
            url = url.join(location) if not location.is_absolute() else location
            if url.scheme not in ("http", "https"):
                break
        # The upstream answered (a redirect loop): no point in asking it again at once.
        raise UpstreamError("UNAVAILABLE", f"upstream {self.name}: too many redirects", 502,
                            retryable=True, upstream_status=resp.status)

    async def get_redirected(self, url: URL, headers: Mapping[str, str], *,
                             kind: str) -> aiohttp.ClientResponse | None:
        """GET `url`, where this upstream redirected a GET before (a CDN's signed URL), as
        it is: no Authorization (it never goes to another host), no redirect followed.
        None if the URL no longer works (expired: 401, 403, 404, 410, or a redirect): ask
        the registry again. The caller owns the response."""
        send_headers = dict(headers)
        try:
            tunnel = self.outbound.login_for(url, send_headers)
            resp = await self.session.get(url, headers=send_headers, allow_redirects=False,
                                          proxy=self.outbound.proxy, proxy_headers=tunnel)
        except TRANSPORT_ERRORS as exc:
            raise self.transport_error(exc, kind) from None
        self._metrics.upstream_requests.labels(self.name, kind, str(resp.status)).inc()
        if resp.status in (*_REDIRECTS, 401, 403, 404, 410):
            resp.release()
            return None
        if resp.status >= 300:
            resp.release()
            raise self._status_error(resp.status, kind, resp.headers)
        return resp

    # ---------------------------------------------------------- error table

    def _status_error(self, status: int, kind: str, headers: Mapping[str, str]) -> UpstreamError:
        self._metrics.upstream_error(self.name, f"http_{status}")
        name = self.name
        if status == 404:
            return UpstreamError(_NOT_FOUND.get(kind, "NOT_FOUND"),
                                 f"not found at upstream {name}", 404, retryable=False,
                                 upstream_status=404)
        if status == 416:
            return UpstreamError("RANGE_INVALID", "requested range not satisfiable", 416,
                                 retryable=False, upstream_status=416)
        if status == 429:
            retry = headers.get("Retry-After", "60")
            return UpstreamError("TOOMANYREQUESTS", f"upstream {name} is rate-limiting the "
                                 f"gateway; retry after {retry}s", 429, retryable=True,
                                 upstream_status=429, headers={"Retry-After": retry})
        if status in (401, 403):
            return UpstreamError("DENIED", f"upstream {name} denied access (repository "
                                 "missing or private)", 403, retryable=False,
                                 upstream_status=status)
        if status >= 500:
            return UpstreamError("UNAVAILABLE", f"upstream {name} failed with HTTP {status}",
                                 502, retryable=True, upstream_status=status)
        return UpstreamError("UNAVAILABLE", f"upstream {name} answered HTTP {status}", 502,
                             retryable=False, upstream_status=status)

    async def read_body(self, resp: aiohttp.ClientResponse, limit: int, kind: str) -> bytes:
        """Read a small answer whole (manifests, tag lists) and release the response.

        Refuses anything over `limit` bytes: an upstream cannot make us buffer a blob.
        """
        try:
            if (resp.content_length or 0) > limit:
                raise UpstreamError("UNAVAILABLE", f"upstream {self.name}: the {kind} answer "
                                    f"is larger than {limit >> 20} MiB", 502, retryable=False)
            body = await resp.content.read(limit + 1)
            while len(body) <= limit and not resp.content.at_eof():
                body += await resp.content.read(limit + 1 - len(body))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self.transport_error(exc, kind) from None
        finally:
            resp.release()
        if len(body) > limit:
            raise UpstreamError("UNAVAILABLE", f"upstream {self.name}: the {kind} answer is "
                                f"larger than {limit >> 20} MiB", 502, retryable=False)
        self._metrics.upstream_bytes.labels(self.name).inc(len(body))
        return body

    def transport_error(self, exc: BaseException, kind: str) -> UpstreamError:
        """Translate a connection failure or timeout (also while reading a body)."""
        if isinstance(exc, TIMEOUTS):
            self._metrics.upstream_error(self.name, "timeout")
            return UpstreamError("UNAVAILABLE", f"upstream {self.name} timed out ({kind})", 504,
                                 retryable=True)
        self._metrics.upstream_error(self.name, "connect")
        reason = type(exc).__name__
        return UpstreamError("UNAVAILABLE", f"upstream {self.name} is unreachable ({reason})",
                             502, retryable=True)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Release an answer not wanted (a 401 before the retry with a token). A small body
    is read first: released unread, its connection closes, and the retry (the first
    blob's) pays a new connection, a round trip more on a far upstream."""
    if resp.content_length is not None and resp.content_length <= _DRAIN:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            await resp.read()
    resp.release()
