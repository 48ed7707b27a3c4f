"""Interception: a CONNECT to a route's registry host answered by the gateway's own app.
The client's TLS is terminated with a minted leaf and the connection is handed to the
app's HTTP protocol (the same routes, cache, single flight, access and metrics).

Keeps which live connections came through CONNECT, so routing can pick the route by the
registry's real host name; forgets each one when it closes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from aiohttp import web

from ..state import ProxiedConnection

HANDSHAKE_TIMEOUT = 30.0


class ProxiedConnections:
    """The connections the proxy terminated, by their TLS transport (what aiohttp gives a
    request as `request.transport`). Built once by the composition root."""

    def __init__(self) -> None:
        self._by_transport: dict[asyncio.BaseTransport, ProxiedConnection] = {}

    def __len__(self) -> int:
        return len(self._by_transport)

    def lookup(self, request: web.Request) -> ProxiedConnection | None:
        if not self._by_transport:  # no proxy client: the common case, on every request
            return None
        transport = request.transport
        return self._by_transport.get(transport) if transport is not None else None

    def add(self, transport: asyncio.BaseTransport, connection: ProxiedConnection) -> None:
        self._by_transport[transport] = connection

    def forget(self, transport: asyncio.BaseTransport) -> None:
        self._by_transport.pop(transport, None)


class _Tap(asyncio.Protocol):
    """Between the TLS transport and aiohttp's protocol: registers the connection before
    aiohttp sees a byte of it, and forgets it when it closes. `start_tls` does not call
    `connection_made` and may deliver the first request (TLS 1.3 sends it with the
    client's Finished) before it returns: that is held until `terminate` connects."""

    def __init__(self, make: Callable[[], asyncio.Protocol], connections: ProxiedConnections,
                 connection: ProxiedConnection) -> None:
        self._make = make
        self._connections = connections
        self._connection = connection
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._held: list[bytes] = []
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._connections.add(transport, self._connection)
        if self._lost:
            self._connections.forget(transport)
            return
        self._inner = self._make()
        self._inner.connection_made(transport)
        held, self._held = self._held, []
        for data in held:
            self._inner.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            self._held.append(data)
        else:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._transport is not None:
            self._connections.forget(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


async def terminate(transport: asyncio.Transport, context: ssl.SSLContext,
                    server: Callable[[], asyncio.Protocol], connections: ProxiedConnections,
                    connection: ProxiedConnection) -> None:
    """TLS on the client's connection (after `200 Connection established`), then the app's
    protocol on top. Raises on a failed handshake (the transport is then closed)."""
    loop = asyncio.get_running_loop()
    tap = _Tap(server, connections, connection)
    tls = await loop.start_tls(transport, tap, context, server_side=True,
                               ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
    if tls is None:  # the loop gives None only when the transport was closed meanwhile
        return
    tap.connection_made(tls)
