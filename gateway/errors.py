"""The one error type of the gateway and its OCI rendering.

Everything a client sees as an error is a `RegistryError`; nothing here knows about
aiohttp handlers or upstreams (the translation tables live where the failures happen).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# OCI distribution spec, "Error Codes" (plus distribution's UNAVAILABLE / TOOMANYREQUESTS).
DEFAULT_STATUS: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 404,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "TAG_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 502,
    "UNKNOWN": 500,
}


class RegistryError(Exception):
    """An error a registry client receives as `{"errors": [...]}` with `status`."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else DEFAULT_STATUS.get(code, 500)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()

    def __repr__(self) -> str:
        return f"RegistryError({self.code!r}, {self.message!r}, {self.status})"


class UpstreamError(RegistryError):
    """A failure talking to an upstream; `retryable` failures allow stale-if-error."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int,
        *,
        retryable: bool,
        upstream_status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(code, message, status, headers=headers)
        self.retryable = retryable
        self.upstream_status = upstream_status


class ConfigError(Exception):
    """A mistake in routes.yaml: names the file, the line and the key."""

    def __init__(self, message: str, *, file: str = "", line: int | None = None,
                 key: str = "") -> None:
        where = file or "<config>"
        if line is not None:
            where += f":{line}"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}")
        self.file = file
        self.line = line
        self.key = key
