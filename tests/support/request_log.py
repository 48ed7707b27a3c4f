"""What reached an upstream: the request log that the fake registry and the counting proxy
share, so tests count requests, ranges and body bytes the same way against either.

It only records; it never changes what a server answers. Thread-safe, because both
servers may run in a thread of their own while the test reads.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from multidict import CIMultiDict

_BLOB_PATH = re.compile(r"^/v2/(?P<repository>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_MANIFEST_PATH = re.compile(r"^/v2/(?P<repository>.+)/manifests/(?P<reference>[^/]+)$")


def resumes(headers: Any) -> bool:
    """Whether a GET's headers ask for a blob's rest (a resume or a later part), not its
    start."""
    return "Range" in headers and not headers["Range"].startswith("bytes=0-")


@dataclass
class Seen:
    """One request as the server saw it. Status and body bytes are filled in *before* the
    bytes go out, so a client that has read a body always finds it counted."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict, repr=False)
    status: int = 0
    body_bytes: int = 0
    # When the request arrived and when its answer's last byte was written (monotonic
    # seconds; None while it runs or if it never ended cleanly): to tell overlapping
    # requests apart, never to judge speed.
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    peer: str | None = None  # the client's address, as the server saw it
    account: str | None = None  # the fake registry's account the request was made as

    @property
    def range(self) -> str | None:
        return self.headers.get("Range")


class RequestLog:
    """Every request, in order of arrival, with the queries tests ask of it."""

    def __init__(self) -> None:
        self._log_lock = threading.Lock()
        self._log: list[Seen] = []

    def record(self, seen: Seen) -> Seen:
        with self._log_lock:
            self._log.append(seen)
        return seen

    def update(self, seen: Seen, *, status: int | None = None, sent: int = 0,
               ended: bool = False) -> None:
        with self._log_lock:
            if status is not None:
                seen.status = status
            seen.body_bytes += sent
            if ended:
                seen.ended = time.monotonic()

    def reset(self) -> None:
        with self._log_lock:
            self._log.clear()

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        """Copies of the requests so far, optionally of one method and/or exact path."""
        with self._log_lock:
            return [replace(s, headers=s.headers.copy()) for s in self._log
                    if (method is None or s.method == method)
                    and (path is None or s.path == path)]

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return len(self.seen(method, path))

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter((s.method, s.path) for s in self.seen())

    def blob_requests(self, repository: str | None = None, *, digest: str | None = None,
                      methods: tuple[str, ...] = ("GET",)) -> list[Seen]:
        """Blob requests (GET by default), optionally of one repository and/or digest."""
        return [s for s in self._matching(_BLOB_PATH, repository, methods)
                if digest is None or s.path.endswith(f"/blobs/{digest}")]

    def manifest_requests(self, repository: str | None = None, *,
                          methods: tuple[str, ...] = ("GET", "HEAD")) -> list[Seen]:
        return self._matching(_MANIFEST_PATH, repository, methods)

    def blob_fetches(self, repository: str | None = None, *, digest: str | None = None) -> int:
        """Fetches of blobs that reached here: GETs of a blob's start (a ranged fetch's
        other parts and a resume ask for later bytes; `blob_bytes` shows none twice)."""
        return sum(not resumes(s.headers) for s in self.blob_requests(repository, digest=digest))

    def blob_bytes(self, repository: str | None = None, *, digest: str | None = None) -> int:
        return sum(s.body_bytes for s in self.blob_requests(repository, digest=digest))

    def requests_for(self, repository: str) -> list[Seen]:
        """Every request whose path names `repository` (manifests, blobs, tags, referrers)."""
        prefix = f"/v2/{repository}/"
        return [s for s in self.seen() if s.path.startswith(prefix)]

    def _matching(self, pattern: re.Pattern[str], repository: str | None,
                  methods: tuple[str, ...]) -> list[Seen]:
        found = []
        for seen in self.seen():
            match = pattern.match(seen.path)
            if match and seen.method in methods and (
                repository is None or match["repository"] == repository
            ):
                found.append(seen)
        return found
