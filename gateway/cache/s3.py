"""The S3-compatible store (AWS, SeaweedFS, MinIO, Ceph RGW...): objects under one bucket
and key prefix, through aiobotocore (botocore on aiohttp).

Serving a blob costs one GET (its size comes with the answer); a large object is written
as fixed-size multipart parts while it streams in and becomes visible under its key only
on `commit()`; `abort()` removes the parts. Never verifies digests (the flight does) and
never logs a key's secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from ..config.storage import S3Keys, StorageSettings
from ..errors import RegistryError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("gateway.cache.s3")

CHUNK = 1 << 20
_MISSING = frozenset(("404", "NoSuchKey", "NotFound"))
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class StoreUnavailable(RegistryError):
    """The object store failed a request (after botocore's retries): the client gets a
    503, never a partial body as a whole one."""

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", message, 503)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _check_key(key: str) -> str:
    # Keys are built by the cache from validated names and digests; refuse anything else.
    if key.startswith("/") or ".." in key.split("/") or key.startswith("."):
        raise ValueError(f"bad store key {key!r}")
    return key


@dataclass
class S3Body:
    """Implements StoredBody: one GET's answer, streamed in reads of up to 1 MiB."""

    size: int
    start: int
    end: int
    _body: Any  # aiobotocore's StreamingBody; None for an empty answer

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        if self._body is None:
            return
        try:
            while True:
                data = await self._body.read(CHUNK)
                if not data:
                    return
                yield data
        except (BotoCoreError, OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise StoreUnavailable(f"object store read broke: {type(exc).__name__}") from None
        finally:
            self.close()

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None


class S3Store:
    """Implements BlobStore, SizedReads and (with `redirect:`) Redirecting."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.part_size = settings.part_size
        self._client: S3Client | None = None
        self._stack = contextlib.AsyncExitStack()
        self._old: list[contextlib.AsyncExitStack] = []

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Make the client; say once at start-up (not per request) if the bucket is not
        reachable. Serving goes on either way: each request reports its own failure."""
        # botocore's debug log prints request headers and URLs (signatures, presigned
        # URLs: secrets for a while): never below INFO, whatever --log-level says.
        for name in ("botocore", "aiobotocore"):
            if logging.getLogger(name).getEffectiveLevel() < logging.INFO:
                logging.getLogger(name).setLevel(logging.INFO)
        self._client = await self._make_client(self._stack, self.settings.keys)
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError, OSError) as exc:
            reason = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
            log.warning("storage: bucket %s at %s is not usable yet (%s)", self.bucket,
                        self.settings.endpoint or "AWS", reason)

    async def _make_client(self, stack: contextlib.AsyncExitStack,
                           keys: S3Keys | None) -> S3Client:
        settings = self.settings
        config = AioConfig(
            region_name=settings.region, signature_version="s3v4",
            s3={"addressing_style": "path" if settings.path_style else "virtual",
                # The flight hashes every byte already; botocore would hash each part
                # again, on the event loop (it signs the payload over plain HTTP).
                "payload_signing_enabled": False},
            # Checksums only where S3 requires them: several S3-compatible services
            # refuse the newer default (CRC32 trailers in aws-chunked bodies).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10, read_timeout=60, max_pool_connections=64)
        creator = get_session().create_client(
            "s3", endpoint_url=str(settings.endpoint) if settings.endpoint else None,
            aws_access_key_id=keys.access_key if keys else None,
            aws_secret_access_key=keys.secret_key if keys else None, config=config)
        client: S3Client = await stack.enter_async_context(creator)
        return client

    async def use_keys(self, settings: StorageSettings) -> None:
        """A reload brought new keys: new requests sign with them. The old client stays
        open for reads in progress until `close()`."""
        if settings.keys == self.settings.keys:
            return
        stack = contextlib.AsyncExitStack()
        client = await self._make_client(stack, settings.keys)
        self._old.append(self._stack)
        self._stack, self._client, self.settings = stack, client, \
            _with_keys(self.settings, settings)

    def reconfigure(self, settings: StorageSettings) -> None:
        """The swap: `redirect:` as the new file has it (keys: `use_keys`, before)."""
        self.settings = replace(self.settings, redirect=settings.redirect)

    async def close(self) -> None:
        for stack in (*self._old, self._stack):
            await stack.aclose()
        self._old.clear()
        self._client = None

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "open() first"
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    # ------------------------------------------------------------ BlobStore

    async def stat(self, key: str) -> int | None:
        try:
            answer = await self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise _unavailable("stat", exc) from None
        except BotoCoreError as exc:
            raise _unavailable("stat", exc) from None
        return int(answer["ContentLength"])

    async def open_read(self, key: str, byte_range: str | None) -> S3Body | None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if byte_range is not None:
            args["Range"] = byte_range
        try:
            answer = await self.client.get_object(**args)
        except ClientError as exc:
            code = _code(exc)
            if code in _MISSING:
                return None
            if code == "InvalidRange":  # past the end: the caller answers 416 with the size
                size = await self.stat(key)
                return None if size is None else S3Body(size, 0, 0, None)
            raise _unavailable("read", exc) from None
        except BotoCoreError as exc:
            raise _unavailable("read", exc) from None
        length = int(answer.get("ContentLength", 0))
        found = _CONTENT_RANGE.fullmatch(answer.get("ContentRange", "") or "")
        if found is None:  # a 200: the whole object
            return S3Body(length, 0, length, answer["Body"])
        first, last, size = (int(g) for g in found.groups())
        return S3Body(size, first, last + 1, answer["Body"])

    async def read(self, key: str, start: int = 0, end: int | None = None
                   ) -> AsyncIterator[bytes]:
        if end is not None and start >= end:
            return
        wanted = None if start == 0 and end is None else \
            f"bytes={start}-{'' if end is None else end - 1}"
        body = await self.open_read(key, wanted)
        if body is None:
            raise FileNotFoundError(key)
        async with contextlib.aclosing(body.chunks()) as chunks:
            async for data in chunks:
                yield data

    async def get(self, key: str) -> bytes | None:
        body = await self.open_read(key, None)
        if body is None:
            return None
        parts = [data async for data in body.chunks()]
        return b"".join(parts)

    async def put(self, key: str, data: bytes) -> None:
        try:
            await self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable("write", exc) from None

    def upload(self, key: str) -> S3Upload:
        return S3Upload(self, self._key(key))

    async def delete(self, key: str) -> None:
        try:
            await self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise _unavailable("delete", exc) from None
        except BotoCoreError as exc:
            raise _unavailable("delete", exc) from None

    # ------------------------------------------------------------ Redirecting

    async def redirect_url(self, key: str, size: int) -> str | None:
        redirect = self.settings.redirect
        if redirect is None or size < redirect.min_size:
            return None
        # Signed here, no request: the client fetches the object from the store itself.
        url: str = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=int(redirect.expires))
        return url


def _with_keys(settings: StorageSettings, new: StorageSettings) -> StorageSettings:
    return replace(settings, keys=new.keys, access_key_ref=new.access_key_ref,
                   secret_key_ref=new.secret_key_ref)


def _unavailable(doing: str, exc: BaseException) -> StoreUnavailable:
    # The error's code and class only: botocore's message may quote the request.
    reason = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
    return StoreUnavailable(f"object store {doing} failed ({reason})")


class S3Upload:
    """Implements Upload. Bytes gather into parts of `part_size`; each full part is sent
    while the next fills (one part in flight). An object smaller than one part is one
    PUT at commit; a larger one is a multipart upload completed at commit."""

    def __init__(self, store: S3Store, key: str) -> None:
        self._store = store
        self._key = key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._sending: asyncio.Task[None] | None = None
        self._done = False

    async def write(self, data: bytes) -> None:
        self._buffer += data
        size = self._store.part_size
        while len(self._buffer) >= size:
            part, self._buffer = bytes(self._buffer[:size]), self._buffer[size:]
            await self._send(part)

    async def _send(self, part: bytes) -> None:
        await self._wait_sending()
        if self._upload_id is None:
            try:
                started = await self._store.client.create_multipart_upload(
                    Bucket=self._store.bucket, Key=self._key)
            except (ClientError, BotoCoreError) as exc:
                raise _unavailable("upload", exc) from None
            self._upload_id = started["UploadId"]
        number = len(self._parts) + 1
        self._parts.append({"PartNumber": number})
        self._sending = asyncio.create_task(self._upload_part(number, part))

    async def _upload_part(self, number: int, part: bytes) -> None:
        assert self._upload_id is not None
        try:
            answer = await self._store.client.upload_part(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id,
                PartNumber=number, Body=part)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable("upload", exc) from None
        self._parts[number - 1]["ETag"] = answer["ETag"]

    async def _wait_sending(self) -> None:
        sending, self._sending = self._sending, None
        if sending is not None:
            await sending

    async def commit(self) -> None:
        client, bucket = self._store.client, self._store.bucket
        try:
            if self._upload_id is None:
                await client.put_object(Bucket=bucket, Key=self._key, Body=bytes(self._buffer))
            else:
                if self._buffer:
                    await self._send(bytes(self._buffer))
                await self._wait_sending()
                await client.complete_multipart_upload(
                    Bucket=bucket, Key=self._key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts})  # type: ignore[typeddict-item]
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable("commit", exc) from None
        self._buffer.clear()
        self._done = True

    async def abort(self) -> None:
        self._buffer.clear()
        sending, self._sending = self._sending, None
        if sending is not None:
            sending.cancel()
            with contextlib.suppress(BaseException):
                await sending
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None or self._done:
            return
        try:
            await self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=upload_id)
        except (ClientError, BotoCoreError, OSError) as exc:
            # The parts are invisible under the key; a bucket lifecycle rule
            # (AbortIncompleteMultipartUpload) removes what is left.
            log.warning("storage: aborting the upload of %s failed (%s)", self._key,
                        _code(exc) if isinstance(exc, ClientError) else type(exc).__name__)

