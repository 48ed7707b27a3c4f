"""The edge of the pipeline: the config snapshot a request runs with, what a trusted proxy
in front says about the request (X-Forwarded-Host/-Proto/-For) and the redirect of plain
HTTP to HTTPS.

Believes forwarded headers only from configured proxies (a client cannot pick a route or
an address by header); never routes, authorizes or logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..config import Config
from ..errors import RegistryError
from ..net import Network, NetworkSet, client_address, split_hostport, valid_host
from .snapshot import PerConfig

# Health checks and scrapes stay on plain HTTP.
_UNCHECKED_PATHS = ("/healthz", "/readyz", "/metrics")


def _last_value(values: list[str]) -> str | None:
    """The value the nearest proxy set: the last item of the (comma-joined) headers."""
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    return items[-1] if items else None


# Not aiohttp-remotes (1.4.0), which would change these rules: `XForwardedFiltered` reads
# X-Forwarded-* from any peer and takes the left-most address when all are trusted;
# `XForwardedStrict` answers 400 to an untrusted peer and to a hop count other than its
# list's, and walks no chain of trusted proxies; neither validates X-Forwarded-Host or
# -Proto; both answer 400 to a repeated header and to an X-Forwarded-For item with a port.
def forwarded_middleware(trusted: NetworkSet | Iterable[Network | str]) -> Middleware:
    """Believe `X-Forwarded-Host/-Proto/-For` only from `trusted` (the configured proxies):
    from anyone else they are ignored, so a client cannot pick a route by header. Of host
    and proto the nearest proxy's value counts; the client address is found by
    `net.client_address` (right to left, past every trusted proxy)."""
    networks = trusted if isinstance(trusted, NetworkSet) else NetworkSet(trusted)

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(_forwarded(request, networks))

    return forwarded


def edge_step() -> Callable[[web.Request, Config], web.Request]:
    """The first step of every request (run by observe, before anything reads the
    client's address or host): applies the config's `trusted_proxies` as
    `forwarded_middleware` does. Cheap when no proxy is trusted: one identity check."""
    trusted: PerConfig[NetworkSet] = PerConfig(lambda config: NetworkSet(config.trusted_proxies))

    def edge(request: web.Request, config: Config) -> web.Request:
        networks = trusted.of(config)
        return _forwarded(request, networks) if networks.networks else request

    return edge


def _forwarded(request: web.Request, networks: NetworkSet) -> web.Request:
    peer = request.remote
    if peer is None or peer not in networks:
        return request
    changes: dict[str, str] = {}
    host = _last_value(request.headers.getall("X-Forwarded-Host", []))
    if host and valid_host(host):
        changes["host"] = host
    proto = _last_value(request.headers.getall("X-Forwarded-Proto", []))
    if proto and proto.lower() in ("http", "https"):
        changes["scheme"] = proto.lower()
    client = client_address(peer, request.headers.getall("X-Forwarded-For", []), networks)
    if client != peer:
        changes["remote"] = client
    if changes:
        request = request.clone(**changes)  # type: ignore[arg-type]
    return request


def redirect_middleware(https_port: int) -> Middleware:
    """Answer plain-HTTP requests with a redirect to the same URL over HTTPS (health
    checks and metrics scrapes excepted). Requests a trusted proxy marks as https are
    served as they are."""
    port = "" if https_port == 443 else f":{https_port}"

    @web.middleware
    async def redirect(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.scheme == "https" or request.path in _UNCHECKED_PATHS:
            return await handler(request)
        host = request.host
        if not host or not valid_host(host):
            raise RegistryError("UNSUPPORTED", "this gateway answers on https:// only", 400)
        hostname, _ = split_hostport(host)  # valid_host: the port, if any, is digits
        if ":" in hostname:
            hostname = f"[{hostname}]"
        location = f"https://{hostname}{port}{request.raw_path}"
        return web.Response(status=308, headers={"Location": location})

    return redirect
