"""The admission of a request: resolve → access → limits as steps of one middleware,
given the request's config (each middleware layer would be a coroutine and a call more
on every request).

Runs the steps in order and nothing else; each step raises its refusal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..state import STATE, RequestState

Step = Callable[[web.Request, RequestState], None]
# Decides at once (None) or returns what is left to await (a login to check).
MaybeAsyncStep = Callable[[web.Request, RequestState], Awaitable[None] | None]


def admit_middleware(resolve: Step, access: MaybeAsyncStep, limit: Step) -> Middleware:
    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request[STATE]  # with the request's config
        resolve(request, state)
        pending = access(request, state)
        if pending is not None:
            await pending
        limit(request, state)
        return await handler(request)

    return admit
