"""Addresses as the gateway reads them: CIDR sets (trusted proxies, allow-lists), host:port
values (command-line listeners, Host headers) and the client address behind trusted proxies.

Pure functions and immutable values: no I/O, no name resolution, no imports from gateway.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Iterable, Iterator
from typing import TypeVar

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_N = TypeVar("_N", ipaddress.IPv4Network, ipaddress.IPv6Network)

# IPv4-mapped IPv6 (::ffff:a.b.c.d, RFC 4291 2.5.5.2): how a dual-stack socket shows an
# IPv4 peer. Such addresses and networks are taken as the IPv4 ones they carry.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_MAPPED_BASE = int(_MAPPED.network_address)

# A Host header: a DNS name (or dotted IPv4) or a bracketed IPv6 literal, with an optional port.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
                      r"|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?", re.ASCII)
_MAX_HOST = 255


def parse_address(value: str) -> Address | None:
    """An IP address from text, None when it is not one. An IPv6 zone id (`fe80::1%eth0`)
    plays no part in membership; an IPv4-mapped IPv6 address becomes its IPv4 address."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _unmapped(network: Network) -> Network:
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= _MAPPED.prefixlen \
            and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(network.network_address) - _MAPPED_BASE,
                                      network.prefixlen - _MAPPED.prefixlen))
    return network


def _ranges(networks: Iterable[_N]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Disjoint [first, last] integer ranges, sorted, for one address family."""
    starts: list[int] = []
    ends: list[int] = []
    for network in ipaddress.collapse_addresses(networks):
        starts.append(int(network.network_address))
        ends.append(int(network.broadcast_address))
    return tuple(starts), tuple(ends)


class NetworkSet:
    """An immutable set of IPv4 and IPv6 networks; `address in networks` is one binary
    search (the networks are collapsed into sorted, disjoint ranges when built).

    Items are networks or addresses, as values or text ("10.0.0.0/8", "192.0.2.1",
    "2001:db8::/32"); host bits are allowed. IPv4-mapped IPv6 items and addresses are taken
    as IPv4, so `::ffff:10.0.0.1` is in `10.0.0.0/8` (and not in `::/0`).
    """

    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, items: Iterable[Network | Address | str] = ()) -> None:
        networks: list[Network] = []
        for item in items:
            try:
                networks.append(_unmapped(ipaddress.ip_network(item, strict=False)))
            except (ValueError, TypeError):
                raise ValueError(f"{item!r} is not an IP address or network "
                                 "like 10.0.0.0/8") from None
        self.networks: tuple[Network, ...] = tuple(networks)
        self._v4 = _ranges(n for n in networks if isinstance(n, ipaddress.IPv4Network))
        self._v6 = _ranges(n for n in networks if isinstance(n, ipaddress.IPv6Network))

    def __contains__(self, address: object) -> bool:
        if not self.networks:  # the common empty deny list: nothing to look up
            return False
        if isinstance(address, str):
            parsed = parse_address(address)
        elif isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            parsed = address.ipv4_mapped
        elif isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            parsed = address
        else:
            return False
        if parsed is None:
            return False
        starts, ends = self._v4 if parsed.version == 4 else self._v6
        value = int(parsed)
        index = bisect.bisect_right(starts, value) - 1
        return index >= 0 and value <= ends[index]

    def __iter__(self) -> Iterator[Network]:
        return iter(self.networks)

    def __len__(self) -> int:
        return len(self.networks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NetworkSet):
            return NotImplemented
        return (self._v4, self._v6) == (other._v4, other._v6)

    def __hash__(self) -> int:
        return hash((self._v4, self._v6))

    def __repr__(self) -> str:
        return f"NetworkSet([{', '.join(repr(str(n)) for n in self.networks)}])"


# ---------------------------------------------------------------- host:port


def split_hostport(value: str) -> tuple[str, int | None]:
    """`host[:port]` into the host (IPv6 without its brackets) and the port, None when
    absent. An unbracketed value with several colons is split at the last one."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r}: an IPv6 address goes in brackets: [::1]:5000")
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            return value, None
        port = port_text
    if port is None:
        return host, None
    if not (port.isascii() and port.isdigit()) or len(port) > 5:
        raise ValueError(f"{value!r}: the port must be a number")
    return host, int(port)


def parse_hostport(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """A listener address: `HOST:PORT`, `[IPv6]:PORT`, or `:PORT` for every IPv4 address
    (`default_host`)."""
    want = f"{value!r}: want HOST:PORT, e.g. 127.0.0.1:5000"
    try:
        host, port = split_hostport(value)
    except ValueError:
        raise ValueError(want) from None
    if port is None or not 0 < port < 65536:
        raise ValueError(want)
    return host or default_host, port


def valid_host(value: str) -> bool:
    """Whether a Host (or X-Forwarded-Host) value is a plain `host[:port]` and nothing more."""
    return len(value) <= _MAX_HOST and _HOST_RE.fullmatch(value) is not None


# ---------------------------------------------------------------- behind proxies


def _forwarded_address(item: str) -> str:
    """The address part of one X-Forwarded-For item: `[v6]:port`, `[v6]`, `v4:port`, bare."""
    if item.startswith("["):
        return item[1:].split("]", 1)[0]
    if item.count(":") == 1:  # IPv4 with a port
        return item.split(":", 1)[0]
    return item


def client_address(peer: str, forwarded_for: Iterable[str], trusted: NetworkSet) -> str:
    """Who the client is: `peer` itself unless `peer` is a trusted proxy; then
    X-Forwarded-For (`forwarded_for`: every header value, each comma-separated) read right
    to left, skipping trusted proxies: the first address no trusted proxy owns is the
    client; anything further left is the client's own claim and is not read. An item that
    is not an address, or a chain of trusted proxies only, leaves `peer`."""
    if peer not in trusted:
        return peer
    items = [item.strip() for value in forwarded_for for item in value.split(",")]
    for item in reversed([item for item in items if item]):
        candidate = _forwarded_address(item)
        if parse_address(candidate) is None:
            return peer
        if candidate not in trusted:
            return candidate
    return peer
