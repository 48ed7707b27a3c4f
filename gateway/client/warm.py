"""`registry-gateway warm`: pull images through a running gateway so that its cache holds
them (its single flight and cache apply, as for any client): the manifest, the chosen
platforms' manifests, then configs and layers, each streamed, verified and discarded.
Speaks HTTP to the gateway only; never writes a file and never sends a credential."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..errors import RegistryError
from ..oci import MANIFEST_MAX
from ..reference import parse_digest
from ..wire import ROUTES_PATH
from .imageref import ImageRef, Platform, parse_image
from .source import info_from_listing
from .target import ClientConfError, Target, route_for_host
from .warm_manifest import (
    ACCEPT,
    Descriptor,
    ImageDoc,
    IndexDoc,
    WarmError,
    digest_of,
    parse_manifest,
    select,
)
from .warm_view import Display, ImageOutcome

PARALLEL = 3  # transfers at once, like dockerd's max-concurrent-downloads
READ_CHUNK = 256 << 10
HASH_CHUNK = 1 << 20  # hash in a thread, this much at a time (house rule: off the loop)
_ERROR_BODY_MAX = 64 << 10


@dataclass(frozen=True)
class WarmOptions:
    platforms: tuple[Platform, ...] | None = None  # None: every platform of an index
    parallel: int = PARALLEL
    timeout: float = 60.0  # seconds to connect, and without a byte while reading


def read_images(images: Sequence[str], files: Sequence[Path]) -> list[ImageRef]:
    """The images to warm, from the command line and then each --file (`-`: stdin), one
    per line, `#` starts a comment; each once, in order. ClientConfError names the line."""
    found = [parse_image(text) for text in images]
    for path in files:
        try:
            text = sys.stdin.read() if str(path) == "-" else path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientConfError(f"cannot read the image list {path}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.partition("#")[0].strip()  # '#' never occurs in a reference
            if entry:
                try:
                    found.append(parse_image(entry))
                except ClientConfError as exc:
                    raise ClientConfError(f"{path}:{number}: {exc}") from None
    if not found:
        raise ClientConfError("name at least one IMAGE, or --file with one image per line")
    return list(dict.fromkeys(found))


def describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out (nothing for {timeout:g}s)"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (f"its TLS certificate does not verify ({exc.certificate_error}); give a "
                "private CA with --ca (`registry-gateway doctor URL` tells more)")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = "connection refused" if isinstance(exc.os_error, ConnectionRefusedError) \
            else exc.os_error.strerror or str(exc.os_error)
        return f"cannot connect to {exc.host}:{exc.port} ({reason})"
    return str(exc) or type(exc).__name__


def x_cache(response: aiohttp.ClientResponse) -> str:
    """How the gateway served it; on a redirect (to a presigned URL) the first answer says."""
    for answer in (*response.history, response):
        if "X-Cache" in answer.headers:
            return answer.headers["X-Cache"]
    return "-"


async def http_problem(response: aiohttp.ClientResponse) -> str:
    """`HTTP 404 MANIFEST_UNKNOWN: ...` from a status and its OCI error body, if any."""
    text = f"HTTP {response.status}"
    if response.status == 401:
        text += " (the gateway wants credentials; warm sends none)"
    length = response.content_length
    if length is None or length > _ERROR_BODY_MAX:
        return text
    try:
        errors = json.loads(await response.read()).get("errors")
        first = errors[0]
        return f"{text} {str(first['code'])[:40]}: {str(first.get('message', ''))[:200]}"
    except (aiohttp.ClientError, ValueError, AttributeError, LookupError, TypeError):
        return text


async def preflight(session: aiohttp.ClientSession, target: Target, seconds: float) -> None:
    """Refuse at once a URL that is not the gateway, or a host that routes to one registry
    only (its listing says so); ClientConfError says what to give instead."""
    base = target.url()
    try:
        async with session.get(base + "/v2/", allow_redirects=False) as response:
            status, location = response.status, response.headers.get("Location", "")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ClientConfError(f"cannot reach the gateway at {base}: "
                              f"{describe(exc, seconds)}") from None
    if status in (301, 302, 307, 308):
        shown = location[:-len("/v2/")] if location.endswith("/v2/") else location
        raise ClientConfError(f"{base}/v2/ redirects to {location[:200]}: give "
                              f"{shown[:200]} instead")
    if status == 403:
        raise ClientConfError(f"{base}/v2/ answered 403: the gateway refuses this machine's "
                              "address; add it to access.allow in the gateway's routes.yaml "
                              "(or take it out of access.deny)")
    if status not in (200, 401):
        raise ClientConfError(f"{base}/v2/ answered {status}, not the registry API: is "
                              f"{base} the gateway?")
    try:
        async with session.get(base + ROUTES_PATH, allow_redirects=False) as response:
            if response.status != 200:
                return
            document = await response.json(content_type=None)
        info = info_from_listing(document, f"the gateway at {base}")
    except (aiohttp.ClientError, TimeoutError, ValueError, ClientConfError):
        return  # an older gateway, or a proxy passing /v2/ only: nothing to check against
    owner = route_for_host(target.host, info)
    if owner is not None:
        raise ClientConfError(
            f"{target.host} is a host of the {owner} route: every request to it goes to "
            f"{owner}, so /v2/<registry>/ cannot name another registry; give a URL whose "
            "host no route claims (the gateway's address, or e.g. https://mirror.<domain>)")


async def _read_manifest(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MANIFEST_MAX:
        raise WarmError(f"{response.content_length} bytes: larger than a manifest may be")
    body = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        body += chunk
        if len(body) > MANIFEST_MAX:
            raise WarmError(f"larger than a manifest may be ({MANIFEST_MAX} bytes)")
    return bytes(body)


def _check_digest(what: str, body: bytes, expected: str | None) -> str:
    try:
        wanted = str(parse_digest(expected)) if expected else None
    except RegistryError:
        raise WarmError(f"{what}: invalid Docker-Content-Digest {str(expected)[:80]!r}") from None
    digest = digest_of(body, wanted or "sha256:")
    if wanted is not None and digest != wanted:
        raise WarmError(f"{what}: the bytes hash to {digest}, not {wanted}")
    return digest


class Warmer:
    """Warms one image at a time; at most `parallel` transfers at once."""

    def __init__(self, session: aiohttp.ClientSession, base: str, options: WarmOptions,
                 display: Display) -> None:
        self._session, self._base = session, base
        self._options, self._display = options, display
        self._limit = asyncio.Semaphore(options.parallel)

    async def warm(self, ref: ImageRef) -> ImageOutcome:
        outcome = ImageOutcome(str(ref))
        started = time.monotonic()
        try:
            images = await self._images(ref, outcome)
            blobs = {b.digest: b for image in images for b in image.blobs}
            outcome.blobs = len(blobs)
            outcome.bytes_expected = sum(b.size for b in blobs.values())
            self._display.planned(outcome)
            await asyncio.gather(*(self._blob(ref, blob, outcome) for blob in blobs.values()))
        except WarmError as exc:
            outcome.errors.append(str(exc))
        outcome.seconds = time.monotonic() - started
        self._display.end(outcome)
        return outcome

    async def _images(self, ref: ImageRef, outcome: ImageOutcome) -> list[ImageDoc]:
        """The image manifests to warm: the one named, or the chosen entries of its index."""
        media_type, body = await self._manifest(ref, ref.reference, ref.digest, outcome)
        top = parse_manifest(media_type, body)
        outcome.digest = outcome.manifests[0][0]
        if isinstance(top, ImageDoc):
            return [top]
        selection = select(top.entries, self._options.platforms)
        outcome.missing_platforms = [str(p) for p in selection.missing]
        if not selection.chosen:
            offered = sorted({str(e.platform) for e in top.entries
                              if e.platform is not None and not e.attestation})
            raise WarmError(f"the index has no {', '.join(outcome.missing_platforms)} "
                            f"manifest (it has {', '.join(offered) or 'no platforms'})")
        outcome.platforms = [str(e.platform or "unknown") for e in selection.chosen]
        results = await asyncio.gather(
            *(self._manifest(ref, e.digest, e.digest, outcome, e.size)
              for e in selection.chosen), return_exceptions=True)
        images = []
        for entry, result in zip(selection.chosen, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            document = parse_manifest(result[0] or entry.media_type, result[1])
            if isinstance(document, IndexDoc):
                raise WarmError(f"manifest {entry.digest}: an index inside an index is not "
                                "warmed")
            images.append(document)
        return images

    def _url(self, ref: ImageRef, kind: str, reference: str) -> str:
        return self._base + ref.path(kind, reference)

    async def _manifest(self, ref: ImageRef, reference: str, expected: str | None,
                        outcome: ImageOutcome, size: int | None = None
                        ) -> tuple[str | None, bytes]:
        """(media type, bytes) of one manifest, its digest checked (against `expected`,
        else the gateway's Docker-Content-Digest), and its size if the index gave one;
        noted in `outcome`."""
        what = "manifest" if reference == ref.reference else f"manifest {reference}"
        try:
            async with self._limit, self._session.get(
                    self._url(ref, "manifests", reference), headers={"Accept": ACCEPT}) as resp:
                if resp.status != 200:
                    raise WarmError(f"{what}: {await http_problem(resp)}")
                body = await _read_manifest(resp)
                cache = x_cache(resp)
                media_type = resp.headers.get("Content-Type", "").partition(";")[0].strip()
                header_digest = resp.headers.get("Docker-Content-Digest")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WarmError(f"{what}: {describe(exc, self._options.timeout)}") from None
        digest = _check_digest(what, body, expected or header_digest)
        if size is not None and len(body) != size:
            raise WarmError(f"{what}: {len(body)} bytes, the index says {size}")
        outcome.manifests.append((digest, cache))
        return media_type or None, body

    async def _blob(self, ref: ImageRef, blob: Descriptor, outcome: ImageOutcome) -> None:
        """One blob; a failure is noted in `outcome` (the image fails, the others go on)."""
        try:
            async with self._limit:
                await self._stream(ref, blob, outcome)
            outcome.blobs_done += 1
        except WarmError as exc:
            outcome.errors.append(f"blob {blob.digest}: {exc}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome.errors.append(f"blob {blob.digest}: "
                                  f"{describe(exc, self._options.timeout)}")

    async def _stream(self, ref: ImageRef, blob: Descriptor, outcome: ImageOutcome) -> None:
        async with self._session.get(self._url(ref, "blobs", blob.digest)) as resp:
            if resp.status != 200:
                raise WarmError(await http_problem(resp))
            if resp.content_length is not None and resp.content_length != blob.size:
                raise WarmError(f"the gateway announces {resp.content_length} bytes, the "
                                f"manifest says {blob.size}")
            cache = x_cache(resp)
            hasher = hashlib.new(blob.digest.partition(":")[0])
            received = await _hash_body(resp.content.iter_chunked(READ_CHUNK), hasher,
                                        blob.size, lambda n: outcome.received(n, cache))
        if received != blob.size:
            raise WarmError(f"the transfer ended after {received} of {blob.size} bytes")
        digest = f"{hasher.name}:{hasher.hexdigest()}"
        if digest != blob.digest:
            raise WarmError(f"the bytes hash to {digest}: not the blob the manifest names")


async def _hash_body(chunks: AsyncIterator[bytes], hasher: hashlib._Hash, size: int,
                     note: Callable[[int], None]) -> int:
    """Feed a body to `hasher` (1 MiB at a time, in a thread); the byte count."""
    received, held = 0, 0
    pending: list[bytes] = []
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > size:
                raise WarmError(f"more than the {size} bytes the manifest says")
            note(len(chunk))
            pending.append(chunk)
            held += len(chunk)
            if held >= HASH_CHUNK:
                await asyncio.to_thread(hasher.update, b"".join(pending))
                pending, held = [], 0
    except aiohttp.ClientPayloadError:
        raise WarmError(f"the transfer broke off after {received} of {size} bytes (the "
                        "gateway ends a body so when the upstream's bytes fail its "
                        "verification; its log says why)") from None
    if pending:
        await asyncio.to_thread(hasher.update, b"".join(pending))
    return received


async def warm(target: Target, refs: Iterable[ImageRef], options: WarmOptions,
               display: Display, context: ssl.SSLContext | None) -> list[ImageOutcome]:
    """Warm each image in turn through the gateway at `target`; one outcome per image.
    ClientConfError if the gateway cannot be used at all."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.timeout,
                                    sock_read=options.timeout)
    connector = aiohttp.TCPConnector(ssl=context or True, limit=options.parallel + 1)
    async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=False, auto_decompress=False,
            headers={"Accept-Encoding": "identity"}) as session:
        await preflight(session, target, options.timeout)
        warmer = Warmer(session, target.url(), options, display)
        async with display:
            return [await warmer.warm(ref) for ref in refs]
