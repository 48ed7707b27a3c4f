"""Repository names, tags and digests: parsing and validation by the OCI grammar.

Pure functions on strings; no I/O. See the distribution spec, "Pulling manifests":
https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import RegistryError

# <name> components, and the whole name capped like distribution (255 characters).
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
NAME_MAX = 255
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_HEX = {"sha256": 64, "sha512": 128}
DIGEST_RE = re.compile(r"(sha256|sha512):([a-f0-9]+)")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(value: str) -> Digest:
    match = DIGEST_RE.fullmatch(value)
    if match is None or len(match.group(2)) != _DIGEST_HEX[match.group(1)]:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise RegistryError("DIGEST_INVALID", f"invalid digest {shown!r}: want sha256:<64 hex>")
    return Digest(match.group(1), match.group(2))


def is_digest(value: str) -> bool:
    return ":" in value


def validate_name(name: str) -> str:
    if len(name) > NAME_MAX:
        raise RegistryError(
            "NAME_INVALID", f"repository name is {len(name)} characters; at most {NAME_MAX}"
        )
    if NAME_RE.fullmatch(name) is None:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise RegistryError(
            "NAME_INVALID",
            f"invalid repository name {shown!r}: lowercase components of [a-z0-9._-] joined by '/'",
        )
    return name


def validate_tag(tag: str) -> str:
    if TAG_RE.fullmatch(tag) is None:
        shown = tag if len(tag) <= 80 else tag[:77] + "..."
        raise RegistryError("TAG_INVALID", f"invalid tag {shown!r}")
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, value: str) -> Reference:
        if is_digest(value):
            return cls(digest=parse_digest(value))
        return cls(tag=validate_tag(value))

    def __str__(self) -> str:
        return str(self.digest) if self.digest is not None else str(self.tag)
