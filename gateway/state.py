"""What one request learns on its way through: its id, its resolved registry call, its
outcome. Set by the pipeline and the handlers, read by the access log; nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from .config import Config, Route
from .reference import Digest, Reference
from .routing import Via

Kind = Literal["manifest", "blob", "tags", "referrers"]
# Awaited before `count` body bytes go out: returns once this client may send them.
Pace = Callable[[int], Awaitable[None]]
# Called just before the gateway asks the upstream on this request's behalf (a miss):
# raises RegistryError (429) when the client is over its budget of misses.
AdmitMiss = Callable[[], None]


@dataclass(frozen=True, slots=True)
class RegistryRequest:
    """A resolved registry API call: which route, which repository, what is asked."""

    route: Route
    repository: str  # as the upstream knows it (Docker Hub's library/ added)
    kind: Kind
    target: Reference | Digest | None  # manifest: Reference; blob, referrers: Digest; tags: None
    via: Via

    @property
    def digest(self) -> Digest:
        """The digest of a blob or referrers call."""
        assert isinstance(self.target, Digest), self.kind
        return self.target

    @property
    def reference(self) -> Reference:
        """The tag or digest of a manifest call."""
        assert isinstance(self.target, Reference), self.kind
        return self.target

    def describe(self) -> str | None:
        """The reference as the access log shows it."""
        return "list" if self.target is None else str(self.target)


@dataclass(frozen=True, slots=True)
class ProxiedConnection:
    """A client connection the forward proxy terminated (gateway/proxy/): the registry
    host it CONNECTed to (which picks the route) and who logged in to the proxy."""

    host: str
    user: str | None = None


# The forward proxy's view of a request's connection: None unless it came through CONNECT.
ProxiedLookup = Callable[[web.Request], ProxiedConnection | None]


@dataclass(slots=True)
class RequestState:
    id: str
    config: Config  # the config the request runs with, whatever reloads happen meanwhile
    registry: RegistryRequest | None = None
    error: str | None = None
    body_bytes: int | None = None  # counted by streaming handlers as they write
    cache: str | None = None  # X-Cache of a streamed answer, for a client that went away
    user: str | None = None  # who logged in (a name, never a secret); None: anonymous
    rule: str | None = None  # the access or limits rule that allowed or refused the request
    pace: Pace | None = None  # set by the limits stage when a byte rate applies to the client
    pace_piece: int = 256 << 10  # bytes sent per `pace` call: the rate holds to within one
    admit_miss: AdmitMiss | None = None  # set by the limits stage: the client's miss budget


STATE = web.RequestKey("gateway_state", RequestState)
