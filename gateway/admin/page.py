"""The status page itself: one HTML page and its script, style and icon, package data of
gateway.admin (static/), in English or 简体中文 after the browser's Accept-Language.

Nothing is fetched from anywhere but this gateway (no CDN, no web fonts), and the
Content-Security-Policy says so to the browser too. Files are read once, off the loop.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from aiohttp import web

from .. import __version__

ASSETS = {"status.js": "text/javascript", "status.css": "text/css",
          "icon.svg": "image/svg+xml"}
LANGUAGES = ("en", "zh-CN")
# Only this gateway: scripts, styles, images and the polled JSON (and no framing).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def language(accept_language: str | None) -> str:
    """en or zh-CN: the first of the browser's languages (by q) that is one of them."""
    ranked: list[tuple[float, int, str]] = []
    for position, item in enumerate((accept_language or "").split(",")):
        tag, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if tag and q > 0:
            ranked.append((-q, position, tag.lower()))
    for _q, _position, tag in sorted(ranked):
        if tag == "zh" or tag.startswith(("zh-", "zh_")):
            return "zh-CN"  # Traditional readers read Simplified better than English
        if tag == "en" or tag.startswith("en-"):
            return "en"
    return "en"


class Page:
    """The assets, read from the package on first use (in a thread) and kept."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] | None = None
        self._lock = asyncio.Lock()

    async def files(self) -> dict[str, bytes]:
        async with self._lock:
            if self._files is None:
                self._files = await asyncio.to_thread(_read_assets)
            return self._files

    async def index(self, request: web.Request) -> web.Response:
        lang = request.query.get("lang")
        if lang not in LANGUAGES:
            lang = language(request.headers.get("Accept-Language"))
        html = (await self.files())["index.html"].decode()
        html = html.replace("{{lang}}", lang).replace("{{version}}", __version__)
        return web.Response(text=html, content_type="text/html", charset="utf-8",
                            headers={**_HEADERS, "Content-Language": lang,
                                     "Vary": "Accept-Language"})

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        body = (await self.files())[name]
        kind = ASSETS[name]
        charset = "utf-8" if kind.startswith("text/") else None
        return web.Response(body=body, content_type=kind, charset=charset, headers=_HEADERS)


def _read_assets() -> dict[str, bytes]:
    static = resources.files(__package__ or "gateway.admin") / "static"
    return {name: (static / name).read_bytes() for name in ("index.html", *ASSETS)}
