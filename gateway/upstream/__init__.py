"""Talking to one upstream registry: auth challenge → token, credentials, proxy, redirects.

One `aiohttp.ClientSession` per upstream. Every failure is translated here, in one
table, into an `UpstreamError` a client can read; tokens and passwords never leave
this package (not in errors, logs or metrics). Which account a request goes out as is
accounts.py's choice; how connections leave the machine is connect.py's.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from cachetools import TLRUCache
from multidict import CIMultiDict
from yarl import URL

from ..config import Route
from ..errors import UpstreamError
from ..metrics import Metrics
from ..singleflight import SharedCalls
from .accounts import Account, AccountPool
from .connect import TIMEOUTS, TRANSPORT_ERRORS, Outbound, outbound

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
# 404 means different things per endpoint (spec, "Error Codes").
_NOT_FOUND = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN", "tags": "NAME_UNKNOWN",
              "referrers": "MANIFEST_UNKNOWN", "ping": "NOT_FOUND"}


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_in: float


@dataclass(frozen=True, slots=True)
class _Challenge:
    scheme: str  # bearer | basic
    realm: str = ""
    service: str = ""


def _parse_challenge(header: str) -> _Challenge | None:
    scheme, _, params = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        return _Challenge("basic")
    if scheme != "bearer":
        return None
    values = dict(_CHALLENGE_PARAM.findall(params))
    if "realm" not in values:
        return None
    return _Challenge("bearer", values["realm"], values.get("service", ""))


def _challenge_scope(header: str) -> str | None:
    return dict(_CHALLENGE_PARAM.findall(header)).get("scope")


class Upstream:
    """The client side of one route. `request` returns a 2xx/3xx-free response or raises."""

    def __init__(self, route: Route, metrics: Metrics, *, read_timeout: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.route = route
        self.name = route.name
        self.settings = route.upstream
        self._metrics = metrics
        self._read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None
        self._challenge: _Challenge | None = None
        self._tokens: TLRUCache[str, _Token] = TLRUCache(
            maxsize=4096, ttu=lambda _k, tok, now: now + tok.expires_in, timer=clock)
        self._token_calls: SharedCalls[str, str] = SharedCalls("token")
        self._pool = AccountPool(route.name, route.upstream.pool, metrics, clock)
        self._outbound: Outbound | None = None

    async def start(self) -> None:
        ssl_context: ssl.SSLContext | bool = True
        if self.settings.ca_file:  # reads a file: off the loop
            ssl_context = await asyncio.to_thread(ssl.create_default_context,
                                                  cafile=self.settings.ca_file)
        self._outbound = outbound(self.settings.proxy, ssl_context)
        connector = self._outbound.connector
        # Per-read timeouts only: a multi-GB layer must not be cut off by a total timeout.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=self._read_timeout)
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

    async def _token(self, challenge: _Challenge, scope: str, rejected: str | None,
                     account: Account) -> str:
        """A token for `scope`: cached, or fetched once however many requests ask at once.

        `rejected` is the Authorization the upstream just refused: a cached token other
        than that one was renewed meanwhile and is used as it is.
        """
        # Per account: each has its own token (and its own pulls) for the same scope.
        key = f"{account.index} {challenge.realm} {challenge.service} {scope}"
        cached = self._tokens.get(key)
        if cached is not None and f"Bearer {cached.value}" != rejected:
            return cached.value
        value, _started = await self._token_calls.call(
            key, lambda: self._fetch_token(challenge, scope, key, account))
        return value

    async def _fetch_token(self, challenge: _Challenge, scope: str, key: str,
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
        self._tokens[key] = _Token(value, max(lifetime * 0.9 - 5, 1.0))
        return value

    async def _authorization(self, scope: str, account: Account,
                             rejected: str | None = None) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = account.credentials
            return aiohttp.encode_basic_auth(creds.username, creds.password) if creds else None
        return "Bearer " + await self._token(challenge, scope, rejected, account)

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

        The caller owns the returned response and must release it.
        """
        scope = f"repository:{repository}:pull" if repository else ""
        pull = method == "GET" and kind == "manifest"  # what Docker Hub counts as a pull
        started = time.monotonic()
        for _attempt in range(len(self._pool.accounts) + 1):
            account = (self._pool.for_pull if pull else self._pool.for_other)(repository)
            resp = await self._authorized(method, path, kind, headers, params, scope, account)
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
        if resp.status >= 300:
            resp.release()
            raise self._status_error(resp.status, kind, resp.headers)
        return resp

    async def _authorized(self, method: str, path: str, kind: str,
                          headers: Mapping[str, str] | None, params: Mapping[str, str] | None,
                          scope: str, account: Account) -> aiohttp.ClientResponse:
        """One request as `account`, answering one 401 challenge; any status returned."""
        authorization = await self._authorization(scope, account)
        retried_auth = False
        while True:
            resp = await self._send(method, path, kind, headers, params, authorization)
            if resp.status != 401 or retried_auth:
                break
            www = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            challenge = _parse_challenge(www)
            if challenge is None or (challenge.scheme == "basic"
                                     and account.credentials is None):
                raise UpstreamError(
                    "UNAUTHORIZED", f"upstream {self.name} requires credentials the gateway "
                    "does not have for this repository", 401, retryable=False, upstream_status=401)
            self._challenge = challenge
            authorization = await self._authorization(_challenge_scope(www) or scope,
                                                      account, rejected=authorization)
            retried_auth = True
        return resp

    async def _send(
        self,
        method: str,
        path: str,
        kind: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        authorization: str | None,
    ) -> aiohttp.ClientResponse:
        url = self.settings.url.with_path(path)
        if params:
            url = url.with_query(params)
        origin = self.settings.url.origin()
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
                                                  allow_redirects=False,
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
        raise UpstreamError("UNAVAILABLE", f"upstream {self.name}: too many redirects", 502,
                            retryable=True)

    # ---------------------------------------------------------- error table

    def _status_error(self, status: int, kind: str, headers: Mapping[str, str]) -> UpstreamError:
        self._metrics.upstream_errors.labels(self.name, f"http_{status}").inc()
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
            self._metrics.upstream_errors.labels(self.name, "timeout").inc()
            return UpstreamError("UNAVAILABLE", f"upstream {self.name} timed out ({kind})", 504,
                                 retryable=True)
        self._metrics.upstream_errors.labels(self.name, "connect").inc()
        reason = type(exc).__name__
        return UpstreamError("UNAVAILABLE", f"upstream {self.name} is unreachable ({reason})",
                             502, retryable=True)
