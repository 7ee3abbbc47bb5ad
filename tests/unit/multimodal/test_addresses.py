"""The SSRF address policy on its own: which hosts and addresses pass."""

from __future__ import annotations

import ipaddress

import pytest

from vlmserve.multimodal.addresses import AddressRefused, HostPolicy, check_host_syntax, is_public_address

NON_PUBLIC = [
    "127.0.0.1", "127.255.0.9", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1", "100.127.255.254",  # shared address space (carrier-grade NAT)
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.0.8", "192.0.2.1", "198.18.0.1",
    "198.51.100.7", "203.0.113.9",
    "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:8.8.8.8",  # IPv4-mapped: refused whatever it maps to
    "::ffff:0:7f00:1", "::ffff:0:808:808", "::ffff:0:a00:7",  # IPv4-translated (SIIT): refused like mapped
    "::127.0.0.1", "::10.0.0.1",  # deprecated IPv4-compatible
    "64:ff9b::7f00:1", "64:ff9b::a00:1",  # NAT64 of loopback / private
    "2002:7f00:1::1", "2002:a00:1::1",  # 6to4 of loopback / private
    "fe80::1%eth0",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2001:4860:4860::8888",
          "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("text", NON_PUBLIC)
def test_non_public_addresses_are_refused(text: str) -> None:
    assert not is_public_address(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", PUBLIC)
def test_public_addresses_pass(text: str) -> None:
    assert is_public_address(ipaddress.ip_address(text))


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "0x7f000001", "127.1", "127.0.1", "0177.0.0.1",
                                  "127.0.0.1.", "0", "1.2.3.4.5", "017700000001", "0x7F.0.0.1", "10.0x0.0.1"])
def test_numeric_host_spellings_are_refused(host: str) -> None:
    with pytest.raises(AddressRefused, match="dotted-quad"):
        check_host_syntax(host)


@pytest.mark.parametrize("host", ["bad host", "a..b", "%31%32%37.0.0.1", "-x.example", "x" * 64 + ".example",
                                  "ex ample.com", ""])
def test_malformed_host_names_are_refused(host: str) -> None:
    with pytest.raises(AddressRefused):
        check_host_syntax(host)


def test_host_syntax_passes_names_and_literals() -> None:
    assert check_host_syntax("images.example.com") is None
    assert check_host_syntax("example.com.") is None
    assert check_host_syntax("xn--fiqs8s.icom.museum") is None
    assert check_host_syntax("1password.example") is None  # numeric first label, alphabetic TLD: a real name
    assert check_host_syntax("8.8.8.8") == ipaddress.ip_address("8.8.8.8")
    assert check_host_syntax("::1") == ipaddress.ip_address("::1")


def test_policy_refuses_a_host_when_any_of_its_addresses_is_private() -> None:
    policy = HostPolicy(())
    public, private = ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("127.0.0.1")
    assert policy.check("x.example", [public]) == public
    with pytest.raises(AddressRefused, match="--allowed-media-hosts"):
        policy.check("x.example", [public, private])
    with pytest.raises(AddressRefused):
        policy.check("x.example", [])


def test_policy_allowlist_by_name_and_by_address() -> None:
    policy = HostPolicy(("Images.Internal", "10.0.0.7", "[::1]"))
    private = ipaddress.ip_address("10.0.0.9")
    assert policy.check("images.internal", [private]) == private  # a listed name may resolve anywhere
    assert policy.check("images.internal.", [private]) == private
    listed = ipaddress.ip_address("10.0.0.7")
    assert policy.check("other.example", [listed]) == listed  # a listed address is fine under any name
    assert policy.check("::1", [ipaddress.ip_address("::1")]) == ipaddress.ip_address("::1")
    with pytest.raises(AddressRefused):
        policy.check("other.example", [private])
    with pytest.raises(AddressRefused):  # the mapped spelling of an allowed IPv4 address is another address
        policy.check("::ffff:10.0.0.7", [ipaddress.ip_address("::ffff:10.0.0.7")])
