"""The admission of a request: resolve → access → limits as steps of one middleware,
given the request's config (each middleware layer would be a coroutine and a call more
on every request).

Runs the steps in order and nothing else; each step raises its refusal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..state import STATE, RequestState

Step = Callable[[web.Request, RequestState], None]
# Decides at once (None) or returns what is left to await (a login to check).
MaybeAsyncStep = Callable[[web.Request, RequestState], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class Admit:
    """The steps in order, for both drivers: the middleware below, and the server's
    registry lane, which resolves first to see whether the request is one it serves."""

    resolve: Step
    access: MaybeAsyncStep
    limit: Step

    async def __call__(self, request: web.Request, state: RequestState) -> None:
        self.resolve(request, state)
        await self.police(request, state)

    async def police(self, request: web.Request, state: RequestState) -> None:
        """The steps past resolve: the access rules (a login may be awaited), limits."""
        pending = self.access(request, state)
        if pending is not None:
            await pending
        self.limit(request, state)


def admit_middleware(admit: Admit) -> Middleware:
    @web.middleware
    async def admitted(request: web.Request, handler: Handler) -> web.StreamResponse:
        await admit(request, request[STATE])  # with the request's config
        return await handler(request)

    return admitted
