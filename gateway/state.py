"""What one request learns on its way through: its id, its parsed registry call, its
outcome. Set by the handlers, read by the access log; nothing else lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .config import Route


@dataclass(frozen=True, slots=True)
class RegistryRequest:
    """A parsed registry API call: which route, which repository, what is asked."""

    route: Route
    repository: str
    kind: str  # manifest | blob | tags | referrers
    reference: str  # tag or digest; "list" for tags
    via: str  # host | path | ns | default


@dataclass(slots=True)
class RequestState:
    id: str
    registry: RegistryRequest | None = None
    error: str | None = None
    body_bytes: int | None = None  # counted by streaming handlers as they write
    cache: str | None = None  # X-Cache of a streamed answer, for a client that went away


STATE = web.RequestKey("gateway_state", RequestState)
