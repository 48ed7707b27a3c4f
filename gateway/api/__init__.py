"""The `/v2/` handlers: take the resolved `RegistryRequest`, ask the cache, write the
response. They never parse paths (the pipeline did) and raise `RegistryError` for the
observe stage to render.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from ..cache import Cache, ManifestResult, MemoryBlob
from ..errors import RegistryError
from ..state import STATE, RegistryRequest
from ..upstream import Upstream
from ..upstream_pool import UpstreamPool
from .blobs import blob_get, blob_head, headers

PASSTHROUGH_MAX = 16 << 20


class Services:
    """What the handlers need, built once by the composition root."""

    def __init__(self, cache: Cache, upstreams: UpstreamPool) -> None:
        self.cache = cache
        self.upstreams = upstreams


SERVICES = web.AppKey("services", Services)


# ---------------------------------------------------------------- handlers


async def base(request: web.Request) -> web.Response:
    """`/v2/`: the API version check every client starts with (no auth needed here)."""
    return web.json_response({}, headers={"X-Cache": "-"})


async def dispatch(request: web.Request) -> web.StreamResponse:
    return await dispatch_with(request.app[SERVICES], request)


async def dispatch_with(services: Services, request: web.Request) -> web.StreamResponse:
    """The handler of the request's resolved call (the app's route, or the server's
    registry lane, which has no router to find `services` through)."""
    reg = request[STATE].registry
    assert reg is not None, "the resolve stage runs before every /v2/<name>/ handler"
    handler = _HANDLERS[(reg.kind, request.method)]
    # The client of the route as the request's config has it, held until the answer is
    # sent: a reload that replaced the route closes the old client only after that.
    pool = services.upstreams
    upstream = await pool.hold(reg.route)
    try:
        return await handler(request, reg, services.cache, upstream)
    finally:
        pool.let_go(upstream)


def accepted(request: web.Request) -> str | None:
    """The manifest types a client takes. Docker and skopeo send one Accept line per
    media type: all of them count."""
    return ", ".join(request.headers.getall("Accept", ())) or None


def held_manifest(services: Services, request: web.Request,
                  reg: RegistryRequest) -> ManifestResult | None:
    """The manifest answer when it is a HIT in this process's memory (no I/O, no
    upstream); None: the handler finds it."""
    return services.cache.manifests.held(reg.route, reg.repository, reg.reference,
                                         accepted(request))


def held_blob(services: Services, request: web.Request,
              reg: RegistryRequest) -> MemoryBlob | None:
    """A blob GET's bytes when the answer is a small blob this process holds in memory,
    whole (no Range) and not redirected (`storage: redirect`); None: the handler answers.
    Nothing counted: `Blobs.hit` counts it once it is served."""
    blobs = services.cache.blobs
    if blobs.redirecting or "Range" in request.headers:
        return None
    return blobs.small(reg.route, reg.digest)


def manifest_headers(reg: RegistryRequest, result: ManifestResult) -> dict[str, str]:
    m = result.manifest
    return {"Content-Type": m.media_type, "Docker-Content-Digest": m.digest,
            "ETag": f'"{m.digest}"', "X-Cache": result.cache,
            "X-Registry-Route": reg.route.name}


async def manifest(request: web.Request, reg: RegistryRequest, cache: Cache,
                   upstream: Upstream) -> web.StreamResponse:
    result = await cache.manifests.get(upstream, reg.route, reg.repository, reg.reference,
                                       accepted(request), admit=request[STATE].admit_miss)
    return web.Response(body=result.manifest.body, headers=manifest_headers(reg, result))


@dataclass(frozen=True, slots=True)
class _Answer:
    body: bytes
    content_type: str | None
    next_page: URL | None  # the upstream's Link rel="next", parsed by aiohttp
    filters_applied: str | None


async def _passthrough(request: web.Request, reg: RegistryRequest, upstream: Upstream,
                       path: str, params: dict[str, str]) -> _Answer:
    admit = request[STATE].admit_miss
    if admit is not None:  # never cached: every one is a miss
        admit()
    resp = await upstream.request("GET", path, kind=reg.kind, repository=reg.repository,
                                  params=params)
    body = await upstream.read_body(resp, PASSTHROUGH_MAX, reg.kind)
    link = resp.links.get("next")
    next_page = link.get("url") if link is not None else None
    return _Answer(body, resp.headers.get("Content-Type"),
                   next_page if isinstance(next_page, URL) else None,
                   resp.headers.get("OCI-Filters-Applied"))


def _client_link(request: web.Request, upstream_next: URL) -> str:
    """The upstream's next page (`</v2/<repo>/tags/list?n=..&last=..>`) for this client."""
    params = {k: v for k, v in upstream_next.query.items() if k in ("n", "last")}
    if "ns" in request.query:
        params["ns"] = request.query["ns"]
    return f'<{request.rel_url.with_query(params)}>; rel="next"'


async def tags(request: web.Request, reg: RegistryRequest, cache: Cache,
               upstream: Upstream) -> web.StreamResponse:
    params: dict[str, str] = {}
    if "n" in request.query:
        n = request.query["n"]
        if not n.isdigit() or int(n) > 100_000:
            raise RegistryError("PAGINATION_NUMBER_INVALID", f"n={n[:20]!r} is not a page size",
                                400)
        params["n"] = n
    if "last" in request.query:
        params["last"] = request.query["last"]
    answer = await _passthrough(request, reg, upstream, f"/v2/{reg.repository}/tags/list",
                                params)
    out = headers(reg, "-", **{"Content-Type": answer.content_type or "application/json"})
    if answer.next_page is not None:
        out["Link"] = _client_link(request, answer.next_page)
    return web.Response(body=answer.body, headers=out)


async def referrers(request: web.Request, reg: RegistryRequest, cache: Cache,
                    upstream: Upstream) -> web.StreamResponse:
    params = {k: request.query[k] for k in ("artifactType",) if k in request.query}
    answer = await _passthrough(request, reg, upstream,
                                f"/v2/{reg.repository}/referrers/{reg.digest}", params)
    out = headers(reg, "-", **{"Content-Type": answer.content_type
                               or "application/vnd.oci.image.index.v1+json"})
    if answer.filters_applied is not None:
        out["OCI-Filters-Applied"] = answer.filters_applied
    return web.Response(body=answer.body, headers=out)


Handler = Callable[[web.Request, RegistryRequest, Cache, Upstream],
                   Awaitable[web.StreamResponse]]
_HANDLERS: dict[tuple[str, str], Handler] = {
    ("manifest", "GET"): manifest,
    ("manifest", "HEAD"): manifest,  # aiohttp sends headers only for HEAD
    ("blob", "GET"): blob_get,
    ("blob", "HEAD"): blob_head,
    ("tags", "GET"): tags,
    ("tags", "HEAD"): tags,
    ("referrers", "GET"): referrers,
    ("referrers", "HEAD"): referrers,
}
