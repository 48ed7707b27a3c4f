"""In-process fakes for unit tests: a tiny OCI registry with token/Basic auth and faults.

Everything here is an aiohttp application served on 127.0.0.1 by the test's own
`aiohttp_server`; it records every request so tests can count what reached upstream.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import time as real_time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

_API = re.compile(r"/v2/(?P<name>.+?)/(?P<kind>manifests|blobs|tags|referrers)/(?P<rest>[^/]+)")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_manifest(*layers: bytes, config: bytes = b"{}", salt: str = "") -> bytes:
    """The bytes of an OCI image manifest naming `config` and `layers` by digest."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest_of(layer), "size": len(layer)} for layer in layers],
    }
    if salt:
        doc["annotations"] = {"salt": salt}
    return json.dumps(doc, sort_keys=True).encode()


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]


@dataclass(repr=False)
class FakeRegistry:
    """A registry with blobs, manifests and tags held in dicts.

    auth: "none", "bearer" (token endpoint at /token on this server) or "basic".
    `overrides[(method, path)]` replaces the normal answer for one path (faults).
    """

    auth: str = "none"
    username: str | None = None  # required at /token (bearer) or on /v2/ (basic)
    password: str | None = None
    token_expires_in: float = 300
    honour_range: bool = True
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    referrers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    overrides: dict[tuple[str, str], Handler] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    token_requests: list[Seen] = field(default_factory=list)
    valid_tokens: dict[str, str] = field(default_factory=dict)  # token -> scope
    redirect_blobs_to: str | None = None  # base URL: blobs answer 307 <base>/cdn/<digest>
    omit_head_digest: bool = False

    def __post_init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self._issued = 0

    # ----------------------------------------------------------- content

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repository: str, body: bytes, *, tag: str | None = None,
                     media_type: str = OCI_MANIFEST) -> str:
        digest = digest_of(body)
        self.manifests[(repository, digest)] = (media_type, body)
        if tag is not None:
            self.tags[(repository, tag)] = digest
        return digest

    def override(self, method: str, path: str, handler: Handler) -> None:
        self.overrides[(method, path)] = handler

    def respond(self, method: str, path: str, status: int, *, body: bytes = b"",
                headers: dict[str, str] | None = None) -> None:
        async def answer(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, body=body, headers=headers)

        self.override(method, path, answer)

    def revoke_tokens(self) -> None:
        self.valid_tokens.clear()

    # ----------------------------------------------------------- counting

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        return [s for s in self.requests
                if (method is None or s.method == method) and (path is None or s.path == path)]

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return len(self.seen(method, path))

    # ----------------------------------------------------------- serving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        seen = Seen(request.method, path, dict(request.query), CIMultiDict(request.headers))
        if path == "/token":
            self.token_requests.append(seen)
            return self._token(request)
        self.requests.append(seen)
        if path.startswith("/cdn/") or path.startswith("/storage/"):
            return self.blob_response(request, path.rsplit("/", 1)[1])
        match = _API.fullmatch(path)
        denied = self._check_auth(request, match.group("name") if match else None)
        if denied is not None:
            return denied
        override = self.overrides.get((request.method, path))
        if override is not None:
            return await override(request)
        if path in ("/v2", "/v2/"):
            return web.json_response({})
        if match is None:
            return self._error(404, "NOT_FOUND")
        name, kind, rest = match.group("name"), match.group("kind"), match.group("rest")
        if kind == "manifests":
            return self._manifest(request, name, rest)
        if kind == "blobs":
            if self.redirect_blobs_to is not None and rest in self.blobs:
                raise web.HTTPTemporaryRedirect(f"{self.redirect_blobs_to}/cdn/{rest}?sig=x")
            return self.blob_response(request, rest)
        if kind == "tags":
            return self._tags(request, name)
        return self._referrers(request, rest)

    def _error(self, status: int, code: str) -> web.Response:
        body = json.dumps({"errors": [{"code": code, "message": code.lower()}]})
        return web.Response(status=status, text=body, content_type="application/json")

    def _check_auth(self, request: web.Request, repository: str | None) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if self.auth == "basic":
            assert self.username is not None and self.password is not None
            if header == basic_header(self.username, self.password):
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
        if self.username is not None:
            assert self.password is not None
            if request.headers.get("Authorization") != basic_header(self.username,
                                                                     self.password):
                return web.Response(status=401)
        self._issued += 1
        token = f"token-{self._issued}"
        self.valid_tokens[token] = request.query.get("scope", "")
        return web.json_response({"token": token, "expires_in": self.token_expires_in})

    def _manifest(self, request: web.Request, repository: str, reference: str) -> web.Response:
        digest = reference if ":" in reference else self.tags.get((repository, reference))
        found = self.manifests.get((repository, digest)) if digest else None
        if found is None:
            return self._error(404, "MANIFEST_UNKNOWN")
        media_type, body = found
        headers = {"Content-Type": media_type}
        if not (self.omit_head_digest and request.method == "HEAD"):
            headers["Docker-Content-Digest"] = str(digest)
        return web.Response(body=body, headers=headers)

    def blob_response(self, request: web.Request, digest: str) -> web.Response:
        data = self.blobs.get(digest)
        if data is None:
            return self._error(404, "BLOB_UNKNOWN")
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if ranged and self.honour_range:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) + 1 if ranged.group(2) else len(data)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return web.Response(status=206, body=data[start:end], headers=headers)
        return web.Response(body=data, headers=headers)

    def _tags(self, request: web.Request, repository: str) -> web.Response:
        names = sorted(tag for (repo, tag) in self.tags if repo == repository)
        if not names:
            return self._error(404, "NAME_UNKNOWN")
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
    """Answer 200 with `parts` written one by one, waiting on `gates[i]` before part i
    and on `end_gate` before ending the body.

    With `content_length` None the body is chunked; with `cut` the connection is
    closed after the parts instead of ending the body cleanly.
    """
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
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
        await asyncio.sleep(0.05)  # let the bytes leave before the connection goes
        assert request.transport is not None
        request.transport.close()
        return resp
    await resp.write_eof()
    return resp


class Clock:
    """Stands in for the `time` module inside one gateway module: real time plus an offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def time(self) -> float:
        return real_time.time() + self.offset

    def monotonic(self) -> float:
        return real_time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)


async def wait_until(predicate: Callable[[], bool], *, within: float = 5.0,
                     what: str = "condition") -> None:
    deadline = real_time.monotonic() + within
    while not predicate():
        if real_time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
