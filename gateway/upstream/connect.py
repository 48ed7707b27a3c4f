"""How one route's requests leave the machine: straight, through an HTTP(S) proxy
(aiohttp's own `proxy=`: absolute-form for http://, CONNECT for https:// targets), or
through a SOCKS5 proxy (a connector from aiohttp-socks, so every connection of the
session goes through it: token realm, registry, the CDN a blob is redirected to).

Builds objects only. The proxy's login lives in them and nowhere else: not in a URL,
a repr, a log line or an error.
"""

from __future__ import annotations

import ssl
from collections.abc import MutableMapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp_socks import (
    ProxyConnectionError,
    ProxyConnector,
    ProxyError,
    ProxyTimeoutError,
    ProxyType,
)
from yarl import URL

from ..config import ProxySettings

SOCKS_PORT = 1080
# What opening a connection may raise: aiohttp's errors, and the SOCKS connector's own
# (not aiohttp.ClientError subclasses), for the one error table in __init__.py.
TIMEOUTS: tuple[type[BaseException], ...] = (TimeoutError, aiohttp.ServerTimeoutError,
                                             ProxyTimeoutError)
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError, ProxyError, ProxyConnectionError, *TIMEOUTS)
# No pool limit overall, 64 connections per host: parallel layer fetches of one upstream
# share one host, and a hard cap there would queue a pull behind another.
LIMIT, LIMIT_PER_HOST = 0, 64


@dataclass(frozen=True)
class Outbound:
    """The session's connector, and the `proxy=` each request passes (an HTTP(S) proxy;
    None when direct or SOCKS, where the connector does it all)."""

    connector: aiohttp.BaseConnector
    proxy: URL | None = None
    proxy_login: str | None = field(default=None, repr=False)  # a Proxy-Authorization value

    def login_for(self, target: URL, headers: MutableMapping[str, str]) -> dict[str, str] | None:
        """Put the proxy's login where it goes for `target`; returns the `proxy_headers=`.

        A plain-http request is sent to the proxy itself, so its login is a header of the
        request; an https one tunnels through CONNECT, which carries the login instead,
        and the request inside the tunnel (seen by the upstream) must not.
        """
        headers.pop("Proxy-Authorization", None)
        if self.proxy_login is None:
            return None
        if target.scheme == "http":
            headers["Proxy-Authorization"] = self.proxy_login
            return None
        return {"Proxy-Authorization": self.proxy_login}


def outbound(proxy: ProxySettings | None, ssl_context: ssl.SSLContext | bool) -> Outbound:
    login = proxy.credentials if proxy is not None else None
    if proxy is not None and proxy.url.scheme in ("socks5", "socks5h"):
        # socks5h: the proxy resolves upstream names (the machine may have no DNS of its
        # own for the outside world); socks5: they are resolved here, as curl does.
        connector = ProxyConnector(
            proxy_type=ProxyType.SOCKS5, host=proxy.url.host or "",
            port=proxy.url.port or SOCKS_PORT,
            username=login.username if login else None,
            password=login.password if login else None,
            rdns=proxy.url.scheme == "socks5h",
            limit=LIMIT, limit_per_host=LIMIT_PER_HOST, ssl=ssl_context)
        return Outbound(connector)
    direct = aiohttp.TCPConnector(limit=LIMIT, limit_per_host=LIMIT_PER_HOST, ssl=ssl_context,
                                  ttl_dns_cache=300)
    if proxy is None:
        return Outbound(direct)
    # Not aiohttp's proxy_auth (deprecated for 4.0); its replacement, proxy_headers, goes
    # on CONNECT only, so login_for puts it on plain-http requests itself.
    return Outbound(direct, proxy.url, aiohttp.encode_basic_auth(login.username, login.password)
                    if login else None)
