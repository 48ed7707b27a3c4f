"""Values as routes.yaml writes them: durations, sizes, host names, URLs, networks.

Each parser turns one raw YAML value into a typed one or raises a ConfigError at its place;
which key uses which parser is the field metadata in model.py. Nothing here reads secrets.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from yarl import URL

from ..net import Network as Network
from .document import Place

FOREVER = float("inf")
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")


class Absent(enum.Enum):
    """A key that is not written, or written as null where null means "not given"."""

    ABSENT = "absent"

    def __bool__(self) -> bool:  # so `value or default` treats it like null
        return False


ABSENT = Absent.ABSENT

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_LABEL_RE = re.compile(_DNS_LABEL)


def parse_duration(value: Any) -> float:
    """`30s`, `10m`, `1h`, `1d`, plain seconds, or `forever`/`never` (0)."""
    if isinstance(value, bool):
        raise ValueError("want a duration like 30s, 10m, 1h, 1d or seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("durations cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("forever", "always", "inf"):
            return FOREVER
        if text in ("never", "off"):
            return 0.0
        match = _DURATION_RE.fullmatch(text)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration: want 30s, 10m, 1h, 1d, seconds, or forever")


def parse_size(value: Any) -> int:
    """Bytes: `8GiB`, `512MiB`, `100MB`, `1.5GiB` (KB/MB/GB/TB are powers of 1000, KiB/MiB/
    GiB/TiB of 1024; a fraction of a byte is dropped), or a plain whole number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("sizes cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match:
            number, unit = match.group(1), (match.group(2) or "b").lower()
            if unit != "b" or "." not in number:
                return int(Decimal(number) * _SIZE_UNITS[unit])
    raise ValueError(f"{value!r} is not a size: want 8GiB, 512MiB, 100MB or a number of bytes")


# ------------------------------------------- parsers for field metadata: (raw, place) -> value


def duration(value: Any, at: Place) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise at.error(str(exc)) from None


def size(value: Any, at: Place) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise at.error(str(exc)) from None


def optional_size(value: Any, at: Place) -> int | None:
    """A size, or null / `off` / `none` for no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    return size(value, at)


def optional_duration(value: Any, at: Place) -> float | None:
    """A duration, or null / `off` / `never` / `forever` for none (no idle limit)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in (
            "off", "none", "never", "forever")):
        return None
    seconds = duration(value, at)
    return None if seconds in (0.0, FOREVER) else seconds


@dataclass(frozen=True)
class FreeSpace:
    """Space to keep free on the data directory's filesystem: a share of it or bytes."""

    fraction: float = 0.0
    bytes: int = 0

    def of(self, filesystem_size: int) -> int:
        return max(int(self.fraction * filesystem_size), self.bytes)

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction else f"{self.bytes} bytes"


def free_space(value: Any, at: Place) -> FreeSpace:
    """`10%` of the filesystem, or a size such as `20GiB`; 0 keeps nothing free."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            percent = -1.0
        if not 0 <= percent < 100:
            raise at.error(f"{value!r} is not a share of the disk: want e.g. 10%")
        return FreeSpace(fraction=percent / 100)
    return FreeSpace(bytes=size(value, at))


def count(value: Any, at: Place) -> int:
    """A whole number from 1 to 64 (how many of something at once)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise at.error(f"{value!r} is not a count: want a whole number from 1 to 64")
    return value


def boolean(value: Any, at: Place) -> bool:
    if not isinstance(value, bool):
        raise at.error("want true or false")
    return value


def dns_label(value: Any, at: Place) -> str | None:
    """One DNS label (`ghcr`); null means none (a preset's label can be taken away)."""
    if value is None:
        return None
    if not _LABEL_RE.fullmatch(str(value)):
        raise at.error(f"{value!r} is not a single DNS label like 'ghcr'")
    return str(value)


def host_names(value: Any, at: Place) -> tuple[str, ...] | Literal[Absent.ABSENT]:
    """A host name or a list of them, lower-cased; null keeps the default (a preset's)."""
    if value is None:
        return ABSENT
    items = _string_list(value, at, "want a list of host names")
    names = tuple(item.lower().rstrip(".") for item in items)
    for i, name in enumerate(names):
        if not _HOST_RE.fullmatch(name):
            raise at.child(f"[{i}]").error(f"{name!r} is not a host name")
    return names


def domains(value: Any, at: Place) -> tuple[str, ...]:
    items = _string_list(value or [], at, "want a list of domains like [example.com]")
    names = tuple(item.lower().strip(".") for item in items)
    for i, name in enumerate(names):
        if not _HOST_RE.fullmatch(name):
            raise at.child(f"[{i}]").error(f"{name!r} is not a domain name")
    return names


def networks(value: Any, at: Place) -> tuple[Network, ...]:
    """`[127.0.0.1, 10.0.0.0/8]`: addresses or networks."""
    if value is None or value is ABSENT:
        return ()
    items = _string_list(value, at, "want a list of addresses or networks, "
                                    "e.g. [127.0.0.1, 10.0.0.0/8]")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise at.child(f"[{i}]").error(f"{item!r} is not an IP address or "
                                           "network like 10.0.0.0/8") from None
    return tuple(out)


def registry_url(value: Any, at: Place) -> URL:
    """`https://registry.example.com`, no path; the path-less URL."""
    url = _url(value, at)
    if url.user is not None or url.password is not None:
        # Never echo the URL: it holds a secret.
        raise at.error("credentials do not go in the upstream URL: use "
                       "credentials: {username, password_env|password_file}")
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        raise at.error(f"{value!r} is not a registry URL like https://registry.example.com")
    return url.with_path("")


def outbound_proxy_url(value: Any, at: Place) -> URL:
    """An outbound proxy's URL: http://, https://, socks5:// or socks5h:// with a host."""
    url = _url(value, at)
    if url.user is not None or url.password is not None:
        # Never echo the URL: it holds a secret.
        raise at.error("credentials do not go in the proxy URL: write proxy: {url, "
                       "username, password_env|password_file}")
    if url.scheme not in PROXY_SCHEMES or not url.host or url.path not in ("", "/"):
        raise at.error(f"{value!r} is not a proxy URL: want {', '.join(PROXY_SCHEMES)}"
                       "://host:port")
    return url.with_path("")


def readable_file(value: Any, at: Place) -> str | None:
    if value is None:
        return None
    if not Path(str(value)).is_file():
        raise at.error(f"{value} is not a readable file")
    return str(value)


def _url(value: Any, at: Place) -> URL:
    try:
        url = URL(str(value))
        url.port  # noqa: B018  (yarl checks the port range lazily)
    except (ValueError, TypeError):
        raise at.error("not a valid URL (want http://host[:port] or https://...)") from None
    return url


def _string_list(value: Any, at: Place, message: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):  # tuples: presets are written in Python
        raise at.error(message)
    return [str(item) for item in value]
