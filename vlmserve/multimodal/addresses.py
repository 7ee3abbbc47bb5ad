"""Which network addresses an image URL may reach: the SSRF policy of media fetching.

A URL's host is checked once, resolved once, and the fetcher then connects to the very address that passed
(see `vlmserve.multimodal.fetch`), so a DNS answer that changes between check and connect (rebinding) cannot
redirect the request. Only globally routable unicast addresses pass, unless the operator allowlisted the host
name or address with `--allowed-media-hosts`.

Python's `ipaddress.is_global` is not enough on its own: depending on the Python version it calls IPv4-compatible
(`::a.b.c.d`), NAT64 (`64:ff9b::/96`), 6to4 (`2002::/16`) and site-local (`fec0::/10`) addresses global, and those
can reach private IPv4 space. The explicit table below closes those gaps on every supported version.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Special-purpose blocks (IANA registries) refused in addition to whatever `is_global` refuses.
_BLOCKED_NETWORKS = tuple(ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/96",  # unspecified, loopback and the deprecated IPv4-compatible addresses
    "::ffff:0:0/96",  # IPv4-mapped: refused outright whatever IPv4 address it carries
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT, RFC 2765): also reaches the IPv4 address it embeds
    "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# A host label made only of digits or a 0x-prefixed hex number: C's inet_aton (and so getaddrinfo) reads such
# hosts as IPv4 in decimal, octal or hex (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1` all mean 127.0.0.1).
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class AddressRefused(Exception):
    """A host or address is not allowed; `reason` is safe to show to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_public_address(address: IPAddress) -> bool:
    """True when `address` is a globally routable unicast address that embeds no non-public IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        embedded = address.sixtofour
        if address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            # 6to4 and NAT64 addresses reach exactly the IPv4 address they carry; decided by it alone, because
            # `is_global` differs across Python versions here (3.11.2 calls all of 2002::/16 private)
            return is_public_address(embedded)
    if address.is_multicast or address.is_unspecified or not address.is_global:
        return False
    return not any(address in net for net in _BLOCKED_NETWORKS if net.version == address.version)


def parse_ip(text: str) -> IPAddress | None:
    """The address `text` spells in canonical IP syntax (no brackets), or None when it is not an IP literal."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def check_host_syntax(host: str) -> IPAddress | None:
    """Refuse host spellings that resolvers read differently from humans; return the IP of an IP literal.

    Only canonical dotted-quad IPv4, IPv6 literals and ordinary DNS names pass. A host whose last label is numeric
    but which is not a canonical dotted quad is refused: no real domain has an all-numeric top-level label, and
    resolvers turn such hosts into IPv4 addresses (`http://2130706433/` reaches 127.0.0.1).
    """
    address = parse_ip(host)
    if address is not None:
        return address
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise AddressRefused("numeric host names must be written as a plain dotted-quad IPv4 address")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise AddressRefused("the image URL's host is not a valid host name")
    return None


class HostPolicy:
    """Decides whether a host name and the addresses it resolved to may be contacted."""

    def __init__(self, allowed_hosts: Iterable[str]) -> None:
        self._allowed_names: set[str] = set()
        self._allowed_addresses: set[IPAddress] = set()
        for entry in allowed_hosts:
            entry = entry.strip().lower()
            address = parse_ip(entry.strip("[]"))
            if address is not None:
                self._allowed_addresses.add(address)
            elif entry:
                self._allowed_names.add(entry.rstrip("."))

    def is_allowed_name(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._allowed_names

    def check(self, host: str, addresses: list[IPAddress]) -> IPAddress:
        """The address to connect to, or AddressRefused. Every address of the host must pass, not only one."""
        if not addresses:
            raise AddressRefused("the image URL's host has no address")
        if not self.is_allowed_name(host):
            for address in addresses:
                if address not in self._allowed_addresses and not is_public_address(address):
                    raise AddressRefused(
                        "the image URL points to a loopback, private, link-local or otherwise non-public address; "
                        "the server operator can allow such hosts with --allowed-media-hosts")
        return addresses[0]
