"""Forward-proxy mode (`serve --proxy-listen`): CONNECT for clients with HTTPS_PROXY, a
host allow-list (destinations.py), interception with leaf certificates from the
gateway's CA (authority.py, intercept.py) or byte-for-byte tunnels (tunnel.py).

Serves intercepted requests with the gateway's own app; never proxies to a destination
that no route or `forward_proxy.hosts` names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from ..errors import RegistryError
from .authority import Authority, AuthorityError, make_ca, permitted_names, write_ca
from .destinations import Decision, Destinations
from .intercept import ProxiedConnections
from .listener import ForwardProxy

__all__ = ["PROXY", "Authority", "AuthorityError", "Decision", "Destinations",
           "ForwardProxy", "ProxiedConnections", "add_routes", "make_ca", "permitted_names",
           "write_ca"]

CA_PATH = "/_gateway/ca.crt"
PROXY = web.AppKey("forward proxy", ForwardProxy)


async def ca_certificate(request: web.Request) -> web.Response:
    """The proxy CA's certificate (public: what client machines install to trust it)."""
    authority = request.app[PROXY].authority
    if authority is None:
        raise RegistryError("NOT_FOUND", "this gateway has no forward_proxy.ca")
    return web.Response(body=authority.pem, content_type="application/x-pem-file")


def add_routes(app: web.Application, proxy: ForwardProxy) -> None:
    """/_gateway/ca.crt, and the CA (forward_proxy.ca) loaded off the loop at start."""
    app[PROXY] = proxy

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        directory = proxy.rules().config.forward_proxy.ca
        if directory is not None:
            proxy.use_authority(await asyncio.to_thread(Authority.load, Path(directory)))
        yield
        await proxy.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get(CA_PATH, ca_certificate)
