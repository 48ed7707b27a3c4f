"""When a cached tag may answer, when it must be revalidated (now, or in the background
while it answers: stale-while-revalidate), when stale will do.

Pure decisions over a tag entry, the route's cache policy and the time; nothing here
talks to an upstream or a store (manifests.py does, following these rules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from ..config import CachePolicy
from ..oci import accepts, takes_index

# A tag is cached per "view". WIDE: the answer to a client that takes an index (the
# canonical one, shared by every client that accepts its type). NARROW: the answer to a
# client that takes no index, which the upstream may have negotiated down to one
# platform's manifest; it must never reach a client that could have had the index.
View = Literal["_tags", "_narrow"]  # folder names: repository components start [a-z0-9]
WIDE: View = "_tags"
NARROW: View = "_narrow"


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    checked: float  # wall clock of the last upstream confirmation

    def encode(self) -> bytes:
        return json.dumps({"digest": self.digest, "media_type": self.media_type,
                           "checked": self.checked}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> TagEntry | None:
        try:
            data = json.loads(raw)
            return cls(str(data["digest"]), str(data["media_type"]), float(data["checked"]))
        except (ValueError, KeyError, TypeError):
            return None

    def confirmed(self, now: float) -> TagEntry:
        return TagEntry(self.digest, self.media_type, now)


def view(accept: str | None) -> View:
    return WIDE if takes_index(accept) else NARROW


def usable(entry: TagEntry | None, accept: str | None) -> bool:
    """A cached tag can answer this client only in a media type it accepts."""
    return entry is not None and accepts(accept, entry.media_type)


def fresh(entry: TagEntry, policy: CachePolicy, now: float) -> bool:
    """Within its TTL: answer without asking upstream."""
    return now - entry.checked < policy.tag_ttl


def may_serve_stale(entry: TagEntry, policy: CachePolicy, now: float) -> bool:
    """Past its TTL, the upstream failing: still within stale-if-error."""
    return now - entry.checked < policy.tag_ttl + policy.stale_if_error


def revalidate_in_background(entry: TagEntry, policy: CachePolicy, now: float) -> bool:
    """Past its TTL, within stale-while-revalidate: answer from cache at once while one
    background HEAD asks upstream."""
    return now - entry.checked < policy.tag_ttl + policy.stale_while_revalidate
