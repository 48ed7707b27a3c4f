"""aiohttp's TestServer, running the app as `serve` does: with the gateway's runner, so
requests take the registry lane (gateway/server/lane.py) as they do in production."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from gateway.server import GatewayRunner


class GatewayTestServer(TestServer):
    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)
