"""A real browser for tests: Debian's `chromium`, headless, driven over the DevTools
protocol (CDP) with aiohttp's websocket client, so no selenium or playwright.

Records every request the page makes (`Network.requestWillBeSent`), evaluates scripts in
the page and takes screenshots. Loopback only; the process is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import IO, Any

import aiohttp

from .net import stop_process
from .tools import require_tool
from .wait import wait_until

# Quiet: no first-run UI, no calls home, no GPU; --no-sandbox because CI runs as root.
_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
          "--no-default-browser-check", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--disable-extensions",
          "--disable-default-apps", "--disable-features=Translate,MediaRouter",
          "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
          "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
          "--window-size=1400,1600")


class CdpError(Exception):
    pass


class Page:
    """One page target's CDP session: `call` a method, `requests` made so far."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.requests: list[str] = []  # URL of every request the page sent
        self.console: list[str] = []  # exceptions and console errors, for failure messages
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Network.requestWillBeSent":
                self.requests.append(data["params"]["request"]["url"])
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(data["params"]["exceptionDetails"])[:500])
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(CdpError("the browser closed the connection"))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        await self._ws.send_str(json.dumps({"id": number, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def open(self, url: str, *, accept_language: str) -> None:
        """Navigate with the browser's languages set to `accept_language` (the header
        and navigator.languages alike), and wait for the load event."""
        agent = await self.evaluate("navigator.userAgent")
        await self.call("Network.setUserAgentOverride", userAgent=agent,
                        acceptLanguage=accept_language)
        await self.call("Page.navigate", url=url)

        async def loaded() -> bool:
            return bool(await self.evaluate("document.readyState === 'complete'"))

        await wait_until(loaded, what=f"{url} to load", interval=0.05)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png",
                               captureBeyondViewport=True)
        await asyncio.to_thread(_save, path, base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with suppress(asyncio.CancelledError):
            await self._reader


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _launch(binary: str, profile: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.Popen([binary, *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)


def _devtools_port(profile: Path) -> int | None:
    try:
        return int((profile / "DevToolsActivePort").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


@asynccontextmanager
async def chromium(workdir: Path) -> AsyncIterator[Page]:
    """A headless chromium with one blank page, its Network and Runtime domains on."""
    binary = require_tool("chromium")
    profile = workdir / "profile"
    profile.mkdir(parents=True, exist_ok=True)
    log = (workdir / "chromium.log").open("wb")
    process = _launch(binary, profile, log)
    try:
        await wait_until(lambda: _devtools_port(profile) is not None or
                         process.poll() is not None, what="chromium's DevTools port")
        port = _devtools_port(profile)
        assert port is not None, (workdir / "chromium.log").read_text()[-2000:]
        async with aiohttp.ClientSession(trust_env=False) as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                targets = await answer.json(content_type=None)
            (target,) = [t for t in targets if t["type"] == "page"]
            ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=1 << 28)
            page = Page(ws)
            try:
                for domain in ("Network", "Page", "Runtime"):
                    await page.call(f"{domain}.enable")
                yield page
            finally:
                await page.close()
    finally:
        stop_process(process)
        log.close()
