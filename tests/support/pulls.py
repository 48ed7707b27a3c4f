"""Pulling through the gateway with aiohttp, the way a registry client does, and
checking every byte against what was pushed upstream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from .images import ACCEPT_ALL_MANIFESTS, Image, Index, sha256_digest
from .wait import wait_until


@dataclass
class Fetched:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def describe(self) -> str:
        return f"{self.status} {dict(self.headers)} {self.body[:300]!r}"


async def fetch(session: aiohttp.ClientSession, url: str, *, method: str = "GET",
                host: str | None = None, params: dict[str, str] | None = None,
                accept: str | None = ACCEPT_ALL_MANIFESTS,
                headers: dict[str, str] | None = None) -> Fetched:
    all_headers = dict(headers or {})
    if host is not None:
        all_headers["Host"] = host
    if accept is not None:
        all_headers.setdefault("Accept", accept)
    async with session.request(method, url, headers=all_headers, params=params,
                               allow_redirects=False) as response:
        body = await response.read()
        return Fetched(response.status, response.headers, body)


@dataclass
class PullResult:
    """X-Cache and X-Registry-Route of each response of one pull, by what was fetched."""

    cache: dict[str, str]
    route: set[str]


async def pull_image(session: aiohttp.ClientSession, base: str, repository: str,
                     reference: str, expected: Image, *, host: str | None = None,
                     params: dict[str, str] | None = None) -> PullResult:
    """GET the manifest by `reference`, then by digest, then every blob; assert the bytes."""
    cache: dict[str, str] = {}
    routes: set[str] = set()

    def note(what: str, fetched: Fetched) -> None:
        cache[what] = fetched.headers.get("X-Cache", "<missing>")
        routes.add(fetched.headers.get("X-Registry-Route", "<missing>"))

    manifest = await fetch(session, f"{base}/v2/{repository}/manifests/{reference}",
                           host=host, params=params)
    assert manifest.status == 200, manifest.describe()
    assert manifest.body == expected.manifest.data, "manifest bytes differ from upstream's"
    assert manifest.headers.get("Docker-Content-Digest") == expected.digest
    assert manifest.headers.get("Content-Type") == expected.manifest.media_type
    note(f"manifest:{reference}", manifest)
    if reference != expected.digest:
        by_digest = await fetch(session, f"{base}/v2/{repository}/manifests/{expected.digest}",
                                host=host, params=params)
        assert by_digest.status == 200, by_digest.describe()
        assert by_digest.body == expected.manifest.data
        note(f"manifest:{expected.digest}", by_digest)
    for blob in expected.blobs:
        fetched = await fetch(session, f"{base}/v2/{repository}/blobs/{blob.digest}",
                              host=host, params=params, accept=None)
        assert fetched.status == 200, f"blob {blob.digest}: {fetched.describe()}"
        assert sha256_digest(fetched.body) == blob.digest, f"blob {blob.digest}: wrong bytes"
        assert len(fetched.body) == blob.size
        note(blob.digest, fetched)
    return PullResult(cache, routes)


async def pull_index(session: aiohttp.ClientSession, base: str, repository: str,
                     reference: str, expected: Index, *, host: str | None = None,
                     params: dict[str, str] | None = None) -> PullResult:
    """GET the index by `reference` (bytes must be intact) and pull every platform."""
    fetched = await fetch(session, f"{base}/v2/{repository}/manifests/{reference}",
                          host=host, params=params)
    assert fetched.status == 200, fetched.describe()
    assert fetched.body == expected.manifest.data, "index bytes differ from upstream's"
    assert fetched.headers.get("Docker-Content-Digest") == expected.digest
    assert fetched.headers.get("Content-Type") == expected.manifest.media_type
    result = PullResult({f"index:{reference}": fetched.headers.get("X-Cache", "<missing>")},
                        {fetched.headers.get("X-Registry-Route", "<missing>")})
    for entry, image in zip(fetched.json()["manifests"], expected.images, strict=True):
        assert entry["digest"] == image.digest
        one = await pull_image(session, base, repository, image.digest, image, host=host,
                               params=params)
        result.cache.update(one.cache)
        result.route |= one.route
    return result


async def wait_cached(session: aiohttp.ClientSession, base: str, repository: str,
                      image: Image, *, host: str | None = None) -> None:
    """Wait until a HEAD of every blob of `image` says `X-Cache: HIT`: clients get the
    verified bytes before the gateway commits them, so right after a pull a blob may
    still be in flight (COALESCED)."""
    for blob in image.blobs:
        url = f"{base}/v2/{repository}/blobs/{blob.digest}"

        async def committed(url: str = url) -> bool:
            head = await fetch(session, url, method="HEAD", host=host, accept=None)
            return head.headers.get("X-Cache") == "HIT"

        await wait_until(committed, what=f"blob {blob.digest} to be committed")


def assert_oci_error(fetched: Fetched) -> list[dict[str, Any]]:
    """The body is the OCI error document: {"errors": [{"code": .., "message": ..}]}."""
    return oci_errors(fetched.headers.get("Content-Type", ""), fetched.body,
                      context=fetched.describe())


def oci_errors(content_type: str | None, body: bytes, *, context: str = "") -> list[dict[str, Any]]:
    """Check an OCI error body (JSON, `errors` list of {code, message}) and return the list."""
    assert (content_type or "").startswith("application/json"), (
        f"error Content-Type {content_type!r}, body {body[:300]!r} {context}")
    try:
        document = json.loads(body)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {body[:300]!r} {context}") from None
    errors = document.get("errors") if isinstance(document, dict) else None
    assert isinstance(errors, list) and errors, f"no errors list: {document!r}"
    for error in errors:
        assert isinstance(error, dict), document
        assert isinstance(error.get("code"), str) and error["code"], document
        assert isinstance(error.get("message"), str), document
    return errors
