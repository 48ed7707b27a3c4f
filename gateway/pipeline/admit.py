"""The admission of a request: resolve → access → limits as steps of one middleware,
given the request's config (each middleware layer would be a coroutine and a call more
on every request).

Runs the steps in order and nothing else; each step raises its refusal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..config import Config
from ..state import STATE

Step = Callable[[web.Request, Config], None]
# Decides at once (None) or returns what is left to await (a login to check).
MaybeAsyncStep = Callable[[web.Request, Config], Awaitable[None] | None]


def admit_middleware(resolve: Step, access: MaybeAsyncStep, limit: Step) -> Middleware:
    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        config = request[STATE].config
        resolve(request, config)
        pending = access(request, config)
        if pending is not None:
            await pending
        limit(request, config)
        return await handler(request)

    return admit
