"""The app's runner: aiohttp's AppRunner, whose server hands each request to the app's
registry lane (lane.py) first. `serve` runs the app with it, and so do the tests that
serve the app in process."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .lane import LANE


class GatewayRunner(web.AppRunner):
    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        # aiohttp's access log stays off: the observe stage writes the gateway's own.
        super().__init__(app, **{**kwargs, "access_log": None})

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        lane = self.app.get(LANE)
        if lane is not None:
            server.request_handler = lane.wrap(server.request_handler)
        return server
