"""gateway/net.py: CIDR sets (against the standard library's ipaddress), host:port values,
and the client address behind trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.net import (
    NetworkSet,
    client_address,
    parse_address,
    parse_hostport,
    split_hostport,
    valid_host,
)

# -- NetworkSet ------------------------------------------------------------------------------


def test_membership_of_addresses_and_networks_both_families() -> None:
    networks = NetworkSet(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32", "::1"])
    assert "10.255.255.255" in networks and "10.0.0.0" in networks
    assert "11.0.0.0" not in networks and "9.255.255.255" not in networks
    assert "192.0.2.1" in networks and "192.0.2.2" not in networks  # an address is a /32
    assert "2001:db8:ffff::1" in networks and "2001:db9::" not in networks
    assert "::1" in networks and "::2" not in networks
    assert ipaddress.ip_address("10.1.2.3") in networks  # address values work too
    for junk in ("", "nope", "10.0.0", "10.0.0.1/8", "[::1]", None, 167772161):
        assert junk not in networks


def test_ipv4_mapped_ipv6_and_zone_ids() -> None:
    networks = NetworkSet(["10.0.0.0/8", "fe80::/10"])
    # A dual-stack socket shows an IPv4 peer as ::ffff:a.b.c.d: the same client.
    assert "::ffff:10.1.2.3" in networks
    assert ipaddress.ip_address("::ffff:10.1.2.3") in networks
    assert "::ffff:11.1.2.3" not in networks
    assert "fe80::1%eth0" in networks  # the zone names the interface, not the address
    # ...and such an address is IPv4, not an IPv6 one that ::/0 would hold.
    assert "::ffff:10.1.2.3" not in NetworkSet(["::/0"])
    # A mapped network (as an operator may copy it from a log) is the IPv4 network.
    mapped = NetworkSet(["::ffff:192.168.0.0/112", "::ffff:203.0.113.7"])
    assert "192.168.4.5" in mapped and "::ffff:192.168.4.5" in mapped
    assert "203.0.113.7" in mapped and "203.0.113.8" not in mapped
    assert parse_address("::ffff:10.1.2.3") == ipaddress.ip_address("10.1.2.3")
    assert parse_address("10.0.0.1%eth0") is None  # IPv4 has no zones


def test_everything_nothing_and_single_hosts() -> None:
    everything = NetworkSet(["0.0.0.0/0", "::/0"])
    assert "0.0.0.0" in everything and "255.255.255.255" in everything
    assert "::" in everything and "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" in everything
    assert "127.0.0.1" not in NetworkSet(["::/0"])  # families do not mix
    assert "::1" not in NetworkSet(["0.0.0.0/0"])
    empty = NetworkSet()
    assert "127.0.0.1" not in empty and not empty and len(empty) == 0
    single = NetworkSet(["198.51.100.4/32", "2001:db8::7/128"])
    assert "198.51.100.4" in single and "198.51.100.5" not in single
    assert "198.51.100.3" not in single
    assert "2001:db8::7" in single and "2001:db8::6" not in single


def test_host_bits_overlaps_value_semantics_and_errors() -> None:
    networks = NetworkSet(["10.1.2.3/8", "10.0.0.0/16", "10.0.0.0/24"])  # host bits allowed
    assert [str(n) for n in networks] == ["10.0.0.0/8", "10.0.0.0/16", "10.0.0.0/24"]
    assert len(networks) == 3
    assert networks == NetworkSet(["10.0.0.0/8"])  # the same addresses: equal, same hash
    assert hash(networks) == hash(NetworkSet([ipaddress.ip_network("10.0.0.0/8")]))
    assert networks != NetworkSet(["10.0.0.0/9"])
    assert "10.0.0.0/8" in repr(networks)
    with pytest.raises(ValueError, match="'nope' is not an IP address or network"):
        NetworkSet(["10.0.0.0/8", "nope"])


def test_a_thousand_networks() -> None:
    # The shape of an allow-list: many disjoint /24s, plus a few wide ones.
    networks = NetworkSet([f"10.{i // 256}.{i % 256}.0/24" for i in range(0, 2000, 2)] +
                          ["172.16.0.0/12", "2001:db8::/48"])
    assert len(networks) == 1002
    assert "10.0.0.9" in networks and "10.0.1.9" not in networks
    assert "10.7.206.255" in networks and "10.7.207.0" not in networks
    assert "172.31.255.255" in networks and "172.32.0.0" not in networks


def _v4_network(value: int, prefix: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((value, prefix), strict=False)


def _v6_network(value: int, prefix: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((value, prefix), strict=False)


v4_networks = st.builds(_v4_network, st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_networks = st.builds(_v6_network, st.integers(0, 2**128 - 1), st.integers(0, 128))
v4_addresses = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6_addresses = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))


def _reference(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
               networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


@given(networks=st.lists(v4_networks | v6_networks, max_size=30),
       addresses=st.lists(v4_addresses | v6_addresses, max_size=30))
def test_membership_matches_ipaddress(networks: list[ipaddress.IPv4Network |
                                                     ipaddress.IPv6Network],
                                      addresses: list[ipaddress.IPv4Address |
                                                      ipaddress.IPv6Address]) -> None:
    # Random networks are rarely IPv4-mapped ones (which NetworkSet takes as IPv4):
    # leave those out of the reference, they have their own test above.
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    networks = [n for n in networks if n.version == 4 or not (
        n.prefixlen >= 96 and n.subnet_of(mapped))]
    candidates = list(addresses)
    # Addresses at and next to every edge: where an off-by-one would show.
    for network in networks:
        first, last = int(network.network_address), int(network.broadcast_address)
        top = 2**32 - 1 if network.version == 4 else 2**128 - 1
        make = ipaddress.IPv4Address if network.version == 4 else ipaddress.IPv6Address
        candidates += [make(v) for v in (first - 1, first, last, last + 1) if 0 <= v <= top]
    found = NetworkSet(networks)
    for address in candidates:
        assert (address in found) == _reference(address, networks), address
        assert (str(address) in found) == _reference(address, networks), address


@given(st.lists(v4_networks, max_size=10), v4_addresses)
def test_ipv4_mapped_text_matches_its_ipv4_address(networks: list[ipaddress.IPv4Network],
                                                   address: ipaddress.IPv4Address) -> None:
    found = NetworkSet(networks)
    assert (f"::ffff:{address}" in found) == (str(address) in found)


# -- host:port ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:5000", ("127.0.0.1", 5000)),
    ("[::1]:5000", ("::1", 5000)),
    ("[::]:443", ("::", 443)),
    (":5000", ("0.0.0.0", 5000)),  # every IPv4 address
    ("gateway.example:65535", ("gateway.example", 65535)),
    ("localhost:1", ("localhost", 1)),
    ("::1:5000", ("::1", 5000)),  # unbracketed: split at the last colon, as before
])
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value", [
    "5000", "localhost", "localhost:", "localhost:0", "localhost:65536", "localhost:http",
    "localhost:-1", "localhost:٥", "[::1]", "[::1]:", "[::1]5000", "[::1:5000", "",
])
def test_parse_hostport_refuses(value: str) -> None:
    with pytest.raises(ValueError, match=r"want HOST:PORT, e\.g\. 127\.0\.0\.1:5000"):
        parse_hostport(value)


def test_parse_hostport_default_host() -> None:
    assert parse_hostport(":8080", default_host="::") == ("::", 8080)


def test_split_hostport_for_host_headers() -> None:
    assert split_hostport("hub.gw.test") == ("hub.gw.test", None)
    assert split_hostport("hub.gw.test:8080") == ("hub.gw.test", 8080)
    assert split_hostport("[2001:db8::1]") == ("2001:db8::1", None)
    assert split_hostport("[2001:db8::1]:8443") == ("2001:db8::1", 8443)
    with pytest.raises(ValueError):
        split_hostport("hub.gw.test:x")


def test_valid_host() -> None:
    for good in ("hub.gw.test", "hub.gw.test.", "hub.gw.test:8080", "10.0.0.1:80", "[::1]",
                 "[::1]:8443", "localhost", "a" * 63 + ".test"):
        assert valid_host(good), good
    for bad in ("", "evil.test, not a host", "a b", "hub.gw.test:", "hub.gw.test:123456",
                "-a.test", "a" * 64 + ".test", "hub.gw.test/x", "[::1", "::1", "a.test:٥",
                ".".join(["a" * 60] * 5)):
        assert not valid_host(bad), bad


# -- client address --------------------------------------------------------------------------

PROXIES = NetworkSet(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


def test_client_address_from_an_untrusted_peer_is_the_peer() -> None:
    assert client_address("203.0.113.9", ["198.51.100.1"], PROXIES) == "203.0.113.9"


def test_client_address_walks_trusted_proxies_right_to_left() -> None:
    # client -> 10.0.0.7 (trusted) -> 10.0.0.8 (trusted) -> us; the client's own claim,
    # left of its real address, is never read.
    values = ["1.1.1.1, 203.0.113.9, 10.0.0.7", "10.0.0.8"]
    assert client_address("127.0.0.1", values, PROXIES) == "203.0.113.9"
    assert client_address("::ffff:10.0.0.1", values, PROXIES) == "203.0.113.9"
    assert client_address("fd00::5", ["2001:db8::9, fd00::6"], PROXIES) == "2001:db8::9"


def test_client_address_item_forms() -> None:
    assert client_address("127.0.0.1", ["203.0.113.9:4711"], PROXIES) == "203.0.113.9"
    assert client_address("127.0.0.1", ["[2001:db8::9]:4711"], PROXIES) == "2001:db8::9"
    assert client_address("127.0.0.1", ["[2001:db8::9]"], PROXIES) == "2001:db8::9"
    assert client_address("127.0.0.1", ["2001:db8::9"], PROXIES) == "2001:db8::9"
    assert client_address("127.0.0.1", [" 203.0.113.9 ,, "], PROXIES) == "203.0.113.9"


def test_client_address_keeps_the_peer_when_the_header_says_nothing_usable() -> None:
    assert client_address("127.0.0.1", [], PROXIES) == "127.0.0.1"
    assert client_address("127.0.0.1", [""], PROXIES) == "127.0.0.1"
    assert client_address("127.0.0.1", ["10.0.0.7, 10.0.0.8"], PROXIES) == "127.0.0.1"
    # Not an address (an obfuscated identifier, garbage): stop, believe nothing further.
    assert client_address("127.0.0.1", ["203.0.113.9, unknown"], PROXIES) == "127.0.0.1"
    assert client_address("127.0.0.1", ["203.0.113.9", "a.test"], PROXIES) == "127.0.0.1"
