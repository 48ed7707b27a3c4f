"""The one fake upstream: an OCI registry whose blobs, manifests, tags and referrers live
in dicts, with token or Basic auth, blob redirects to a CDN path, and scripted
per-request faults (see faults.py: `queue`, `always`, `release`). It records every
request (request_log.py), so tests count what reached upstream.

Accounts: `accounts={user: password}` are each let in (Basic, or Basic at /token for a
bearer token that remembers its account); `pull_limits={user: n}` makes manifest GETs
count against each account as Docker Hub does (rate-limit headers, a 429 at 0, HEADs
free); `queue_for`/`always_for` script the answers one account gets.

It is served in process by aiohttp's test server (`fake.app`) or from a thread of its own
(`run_fake_registry`), on loopback only. It never judges what the gateway does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from .client import basic_header
from .faults import (
    NO_FAULT,
    Fault,
    Handler,
    PathSpec,
    Script,
    Scripted,
    Step,
    fault_answer,
    hang_up,
    oci_error,
    pieces,
    rate_limited,
    send_body,
)
from .images import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, sha256_digest
from .request_log import RequestLog, Seen
from .threaded import ThreadedServer

__all__ = ["FAKE_ROUTE", "FakeRegistry", "Handler", "PathSpec", "RunningFake", "Step",
           "fake_routes", "image_manifest", "run_fake_registry", "stream_in_parts"]

FAKE_ROUTE = "fake.registry.test"
OCTET = "application/octet-stream"
_API = re.compile(r"/v2/(?P<name>.+?)/(?P<kind>manifests|blobs|tags|referrers)/(?P<rest>[^/]+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def image_manifest(*layers: bytes, config: bytes = b"{}", salt: str = "") -> bytes:
    """The bytes of an OCI image manifest naming `config` and `layers` by digest."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256_digest(layer),
                    "size": len(layer)} for layer in layers],
    }
    if salt:
        doc["annotations"] = {"salt": salt}
    return json.dumps(doc, sort_keys=True).encode()


def fake_routes(url: str, **extra: Any) -> dict[str, Any]:
    """routes.yaml for a gateway whose default route is a fake upstream at `url`."""
    return {"default_route": FAKE_ROUTE, "routes": {FAKE_ROUTE: {"upstream": url, **extra}}}


def _error(status: int, code: str) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": code.lower()}]})
    return web.Response(status=status, text=body, content_type="application/json")


def _span(request: web.Request, size: int) -> tuple[int, int] | None:
    """The [start, end) a Range header asks for, None without one; start == size is
    past the end (416)."""
    ranged = _RANGE.fullmatch(request.headers.get("Range", ""))
    if ranged is None:
        return None
    start = min(int(ranged.group(1)), size)
    end = min(int(ranged.group(2)) + 1, size) if ranged.group(2) else size
    return start, end


class FakeRegistry(RequestLog, Scripted):
    """A registry with blobs, manifests and tags held in dicts.

    auth: "none", "bearer" (token endpoint at /token on this server) or "basic".
    `concurrency_cap`: requests beyond that many at once get `over_cap` (429);
    `peak_concurrency` says how many there ever were at once.
    """

    def __init__(self, *, auth: str = "none", username: str | None = None,
                 password: str | None = None, token_expires_in: float = 300,
                 honour_range: bool = True, redirect_blobs_to: str | None = None,
                 omit_head_digest: bool = False, concurrency_cap: int | None = None,
                 over_cap: Fault | None = None, accounts: dict[str, str] | None = None,
                 pull_limits: dict[str, int] | None = None,
                 ratelimit_window: int = 21600) -> None:
        RequestLog.__init__(self)
        Scripted.__init__(self)
        self.auth = auth
        self.username = username  # required at /token (bearer) or on /v2/ (basic)
        self.password = password
        self.token_expires_in = token_expires_in
        self.honour_range = honour_range
        self.redirect_blobs_to = redirect_blobs_to  # blobs answer 307 <base>/cdn/<digest>
        self.omit_head_digest = omit_head_digest
        self.concurrency_cap = concurrency_cap
        self.over_cap = over_cap or rate_limited()
        self.accounts = dict(accounts or {})
        if username is not None and password is not None:
            self.accounts.setdefault(username, password)
        self.pull_limits = pull_limits  # account ("anonymous" too) -> pulls per window
        self.pulls: Counter[str] = Counter()  # manifest GETs counted, by account
        self.ratelimit_window = ratelimit_window
        self.token_accounts: dict[str, str] = {}  # token -> the account it was issued to
        self.account_scripts: dict[str, Script] = {}
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.tags: dict[tuple[str, str], str] = {}
        self.referrers: dict[str, list[dict[str, Any]]] = {}
        self.valid_tokens: dict[str, str] = {}  # token -> scope
        self.token_log = RequestLog()  # /token requests, apart from the registry's own
        self.active = 0
        self.peak_concurrency = 0
        self._issued = itertools.count(1)
        self.app = self.make_app()

    def __repr__(self) -> str:
        return f"FakeRegistry(auth={self.auth!r}, {len(self.seen())} requests)"

    def make_app(self) -> web.Application:
        """A fresh application over this fake's state (a thread's server needs its own)."""
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # ----------------------------------------------------------- content

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repository: str, body: bytes, *, tag: str | None = None,
                     media_type: str = OCI_MANIFEST) -> str:
        digest = sha256_digest(body)
        self.manifests[(repository, digest)] = (media_type, body)
        if tag is not None:
            self.tags[(repository, tag)] = digest
        return digest

    def revoke_tokens(self) -> None:
        self.valid_tokens.clear()

    def queue_for(self, account: str, method: str, path: PathSpec, *steps: Step) -> None:
        """Like `queue`, for requests made as `account` only (before the shared script)."""
        self.account_scripts.setdefault(account, Script()).queue(method, path, *steps)

    def always_for(self, account: str, method: str, path: PathSpec, step: Step) -> None:
        self.account_scripts.setdefault(account, Script()).always(method, path, step)

    def reset_pulls(self, account: str | None = None) -> None:
        """A new window: the account's (or every account's) pulls start again."""
        if account is None:
            self.pulls.clear()
        else:
            self.pulls.pop(account, None)

    # ----------------------------------------------------------- scripting

    @property
    def overrides(self) -> dict[tuple[str, PathSpec], Step]:
        """The standing steps by (method, path): clear it to serve normally again."""
        return self.script.standing

    def override(self, method: str, path: PathSpec, handler: Handler) -> None:
        self.always(method, path, handler)

    def respond(self, method: str, path: PathSpec, status: int, *, body: bytes = b"",
                headers: dict[str, str] | None = None) -> None:
        """Every matching request gets exactly `status`, `body` and `headers`."""
        self.always(method, path, Fault(status=status, body=body, headers=headers or {}))

    # ----------------------------------------------------------- counting

    @property
    def requests(self) -> list[Seen]:
        return self.seen()

    @property
    def token_requests(self) -> list[Seen]:
        return self.token_log.seen()

    # ----------------------------------------------------------- answers for handlers

    def blob_response(self, request: web.Request, digest: str) -> web.Response:
        """The normal answer for a blob (a custom handler's fallback)."""
        data = self.blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN")
        headers = {"Content-Type": OCTET, "Docker-Content-Digest": digest}
        span = _span(request, len(data)) if self.honour_range else None
        if span is None:
            return web.Response(body=data, headers=headers)
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        return web.Response(status=206, body=data[start:end], headers=headers)

    def manifest_response(self, request: web.Request, repository: str,
                          reference: str) -> web.Response:
        """The normal answer for a manifest by tag or digest (a custom handler's fallback)."""
        found = self._find_manifest(repository, reference)
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN")
        digest, media_type, body = found
        return web.Response(body=body, headers=self._manifest_headers(request, digest,
                                                                      media_type))

    # ----------------------------------------------------------- serving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        seen = Seen(request.method, path, dict(request.query), CIMultiDict(request.headers),
                    peer=request.remote, account=self._account_of(request))
        log = self.token_log if path == "/token" else self
        log.record(seen)
        if self.concurrency_cap is not None and self.active >= self.concurrency_cap:
            log.update(seen, status=self.over_cap.status)
            return fault_answer(self.over_cap)
        self.active += 1
        self.peak_concurrency = max(self.peak_concurrency, self.active)
        try:
            response = await self._answer(request, seen)
        except web.HTTPException as exc:  # a redirect, from the fake or a handler
            log.update(seen, status=exc.status)
            raise
        finally:
            self.active -= 1
        if not response.prepared:
            sent = 0
            if request.method != "HEAD" and isinstance(response, web.Response) and \
                    isinstance(response.body, bytes):
                sent = len(response.body)
            log.update(seen, status=response.status, sent=sent)
        return response

    async def _answer(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        path = request.path
        match = _API.fullmatch(path)
        if path != "/token" and not path.startswith(("/cdn/", "/storage/")):
            # Authentication comes before any scripted step, as at a real registry.
            denied = self._check_auth(request, match.group("name") if match else None)
            if denied is not None:
                return denied
        own = self.account_scripts.get(seen.account or "anonymous")
        step = own.take(request.method, path) if own is not None else None
        if step is None:
            step = self.script.take(request.method, path)
        if step is not None and not isinstance(step, Fault):
            return await step(request)
        fault = step or NO_FAULT
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status is not None:
            return fault_answer(fault)
        return await self._normal(request, seen, match, fault)

    async def _normal(self, request: web.Request, seen: Seen, match: re.Match[str] | None,
                      fault: Fault) -> web.StreamResponse:
        path = request.path
        if path == "/token":
            return self._with_headers(self._token(request), fault)
        if path.startswith(("/cdn/", "/storage/")):
            return await self._blob(request, seen, path.rsplit("/", 1)[1], fault)
        if path in ("/v2", "/v2/"):
            return self._with_headers(web.json_response({}), fault)
        if match is None:
            return _error(404, "NOT_FOUND")
        name, kind, rest = match.group("name"), match.group("kind"), match.group("rest")
        if kind == "manifests":
            return await self._manifest(request, seen, name, rest, fault)
        if kind == "blobs":
            if self.redirect_blobs_to is not None and rest in self.blobs:
                raise web.HTTPTemporaryRedirect(f"{self.redirect_blobs_to}/cdn/{rest}?sig=x")
            return await self._blob(request, seen, rest, fault)
        if kind == "tags":
            return self._with_headers(self._tags(request, name), fault)
        return self._with_headers(self._referrers(request, rest), fault)

    @staticmethod
    def _with_headers(response: web.Response, fault: Fault) -> web.Response:
        response.headers.update(fault.headers)
        return response

    def _check_auth(self, request: web.Request, repository: str | None) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if self.auth == "basic":
            assert self.accounts, "a basic-auth fake needs an account"
            if any(header == basic_header(u, p) for u, p in self.accounts.items()):
                return None
            return web.Response(status=401, headers={
                "WWW-Authenticate": 'Basic realm="fake"'})
        if self.auth == "bearer":
            scope = f"repository:{repository}:pull" if repository else ""
            token = header[len("Bearer "):] if header.startswith("Bearer ") else None
            # A token is good for the scope it was issued for (any token for /v2/).
            if token is not None and token in self.valid_tokens and \
                    (not scope or self.valid_tokens[token] == scope):
                return None
            realm = f"{request.url.origin()}/token"
            challenge = f'Bearer realm="{realm}",service="fake-registry"'
            if scope:
                challenge += f',scope="{scope}"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        return None

    def _token(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization")
        account = next((u for u, p in self.accounts.items() if given == basic_header(u, p)),
                       None)
        if self.accounts and account is None and (given is not None
                                                  or self.username is not None):
            return web.Response(status=401)
        token = f"token-{next(self._issued)}"
        self.valid_tokens[token] = request.query.get("scope", "")
        if account is not None:
            self.token_accounts[token] = account
        return web.json_response({"token": token, "expires_in": self.token_expires_in})

    def _find_manifest(self, repository: str,
                       reference: str) -> tuple[str, str, bytes] | None:
        digest = reference if ":" in reference else self.tags.get((repository, reference))
        found = self.manifests.get((repository, digest)) if digest else None
        if digest is None or found is None:
            return None
        return digest, found[0], found[1]

    def _manifest_headers(self, request: web.Request, digest: str,
                          media_type: str) -> dict[str, str]:
        headers = {"Content-Type": media_type}
        if not (self.omit_head_digest and request.method == "HEAD"):
            headers["Docker-Content-Digest"] = digest
        return headers

    async def _manifest(self, request: web.Request, seen: Seen, repository: str,
                        reference: str, fault: Fault) -> web.StreamResponse:
        found = self._find_manifest(repository, reference)
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN")
        digest, media_type, body = found
        headers = self._manifest_headers(request, digest, media_type)
        if self.pull_limits is not None:
            account = seen.account or "anonymous"
            limit = self.pull_limits.get(account, 0)
            if request.method == "GET" and self.pulls[account] >= limit:
                return fault_answer(oci_error(429, "TOOMANYREQUESTS", "pull rate limit",
                                              **self._quota_headers(account)))
            if request.method == "GET":
                self.pulls[account] += 1
            headers.update(self._quota_headers(account))
        return await self._stream(request, seen, body, headers, fault, ranged=False)

    def _quota_headers(self, account: str) -> dict[str, str]:
        assert self.pull_limits is not None
        limit = self.pull_limits.get(account, 0)
        window = self.ratelimit_window
        return {"RateLimit-Limit": f"{limit};w={window}",
                "RateLimit-Remaining": f"{max(limit - self.pulls[account], 0)};w={window}",
                "Docker-RateLimit-Source": f"source-of-{account}"}

    def _account_of(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return self.token_accounts.get(header[len("Bearer "):])
        return next((u for u, p in self.accounts.items() if header == basic_header(u, p)),
                    None)

    async def _blob(self, request: web.Request, seen: Seen, digest: str,
                    fault: Fault) -> web.StreamResponse:
        data = self.blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN")
        headers = {"Content-Type": OCTET, "Docker-Content-Digest": digest}
        if self.honour_range and not fault.ignore_range:
            headers["Accept-Ranges"] = "bytes"
        return await self._stream(request, seen, data, headers, fault, ranged=True)

    async def _stream(self, request: web.Request, seen: Seen, data: bytes,
                      headers: dict[str, str], fault: Fault,
                      ranged: bool) -> web.StreamResponse:
        """Send `data` (or the fault's bytes) honouring Range, with `fault` applied."""
        body = data if fault.body is None else fault.body
        size = len(body)
        honour = ranged and self.honour_range and not fault.ignore_range
        span = _span(request, size) if honour else None
        if span is not None and span[0] >= size:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        start, end = span or (0, size)
        response = web.StreamResponse(status=200 if span is None else 206,
                                      headers={**headers, **fault.headers})
        if span is not None:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if fault.content_range is not None:
            response.headers["Content-Range"] = fault.content_range
        if fault.chunked and request.method != "HEAD":
            response.enable_chunked_encoding()
        else:
            response.content_length = end - start
        self.update(seen, status=response.status)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        await send_body(request, response, pieces(body, start, end), start=start, fault=fault,
                        gate=self.gate, on_sent=lambda n: self.update(seen, sent=n))
        await response.write_eof()
        return response

    def _tags(self, request: web.Request, repository: str) -> web.Response:
        names = sorted(tag for (repo, tag) in self.tags if repo == repository)
        if not names:
            return _error(404, "NAME_UNKNOWN")
        last = request.query.get("last")
        if last is not None:
            names = [n for n in names if n > last]
        headers = {}
        if "n" in request.query:
            n = int(request.query["n"])
            if len(names) > n:
                names = names[:n]
                headers["Link"] = (f'</v2/{repository}/tags/list?last={names[-1]}&n={n}>; '
                                   'rel="next"')
        return web.json_response({"name": repository, "tags": names}, headers=headers)

    def _referrers(self, request: web.Request, digest: str) -> web.Response:
        manifests = self.referrers.get(digest, [])
        headers = {}
        wanted = request.query.get("artifactType")
        if wanted is not None:
            manifests = [m for m in manifests if m.get("artifactType") == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return web.Response(body=json.dumps(body).encode(), headers={
            "Content-Type": OCI_INDEX, **headers})


async def stream_in_parts(request: web.Request, parts: list[bytes], *,
                          gates: list[asyncio.Event | None] | None = None,
                          end_gate: asyncio.Event | None = None,
                          content_length: int | None = None,
                          cut: bool = False) -> web.StreamResponse:
    """For a custom handler: answer 200 with `parts` written one by one, waiting on
    `gates[i]` before part i and on `end_gate` before ending the body.

    With `content_length` None the body is chunked; with `cut` the connection is
    closed after the parts instead of ending the body cleanly.
    """
    resp = web.StreamResponse(headers={"Content-Type": OCTET})
    if content_length is None:
        resp.enable_chunked_encoding()
    else:
        resp.content_length = content_length
    await resp.prepare(request)
    for i, part in enumerate(parts):
        gate = gates[i] if gates is not None and i < len(gates) else None
        if gate is not None:
            await gate.wait()
        await resp.write(part)
    if end_gate is not None:
        await end_gate.wait()
    if cut:
        await hang_up(request, reset=False)
    await resp.write_eof()
    return resp


@dataclass
class RunningFake:
    """A fake registry served from a thread of its own."""

    fake: FakeRegistry
    server: ThreadedServer

    @property
    def url(self) -> str:
        return self.server.url


@contextmanager
def run_fake_registry(fake: FakeRegistry | None = None) -> Iterator[RunningFake]:
    """Serve `fake` (a new open one by default) from a thread until the block ends."""
    fake = fake or FakeRegistry()
    server = ThreadedServer(fake.make_app)
    server.start()
    try:
        yield RunningFake(fake, server)
    finally:
        fake.release()  # a response parked at the gate must not hold the shutdown
        server.stop()
