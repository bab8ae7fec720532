"""cluster/addresses.py: what a node advertises and gossips is always dialable, never a wildcard."""

from __future__ import annotations

import pytest

from exo_stable.cluster.addresses import (
    addresses_from_capabilities,
    advertised_addresses,
    api_capabilities,
    dial_candidates,
    format_host_port,
    interface_hosts,
    is_dialable,
    is_wildcard,
    parse_host_port,
    unmap,
)

IFACES = ["127.0.0.1", "10.77.0.2", "::1", "fe80::1", "fd00:77::2", "169.254.3.4"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "*", "0:0:0:0:0:0:0:0"])
def test_wildcards_are_never_dialable(host: str) -> None:
    assert is_wildcard(host)
    assert not is_dialable(host)


@pytest.mark.parametrize("host", ["10.77.0.1", "::1", "fd00::1", "node-a.local", "127.0.0.1"])
def test_unicast_and_names_are_dialable(host: str) -> None:
    assert not is_wildcard(host)
    assert is_dialable(host)


def test_multicast_is_not_dialable() -> None:
    assert not is_dialable("224.0.0.251")


def test_format_brackets_ipv6_only() -> None:
    assert format_host_port("10.0.0.1", 5) == "10.0.0.1:5"
    assert format_host_port("fd00::1", 5) == "[fd00::1]:5"
    assert format_host_port("host.lan", 5) == "host.lan:5"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:7000", ("10.0.0.1", 7000)),
        ("10.0.0.1", ("10.0.0.1", 52415)),
        ("[fd00::1]:7000", ("fd00::1", 7000)),
        ("[fd00::1]", ("fd00::1", 52415)),
        ("fd00::1", ("fd00::1", 52415)),
        ("gpu-box.lan:8000", ("gpu-box.lan", 8000)),
        ("  10.0.0.1:1 ", ("10.0.0.1", 1)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default_port=52415) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0.0.0.0:52415", "wildcard"),
        ("[::]:1", "wildcard"),
        ("10.0.0.1:0", "port"),
        ("10.0.0.1:70000", "port"),
        ("10.0.0.1:x", "port"),
        ("[fd00::1", "']'"),
        ("[10.0.0.1]:5", "IPv6"),
        ("[fd00::1]x", "':port'"),
        (":5", "missing host"),
        ("", "empty"),
    ],
)
def test_parse_host_port_refuses_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_host_port(text, default_port=52415)


def test_parse_without_default_port_needs_one() -> None:
    with pytest.raises(ValueError, match="missing port"):
        parse_host_port("10.0.0.1")


def test_interfaces_for_ipv4_wildcard_skip_loopback_and_ipv6() -> None:
    assert interface_hosts("0.0.0.0", IFACES) == ["10.77.0.2", "169.254.3.4"]


def test_interfaces_for_ipv6_wildcard_are_ipv6_but_not_link_local() -> None:
    # asyncio binds "::" with IPV6_V6ONLY: IPv4 peers cannot reach it, so no IPv4 address is advertised.
    assert interface_hosts("::", IFACES) == ["fd00:77::2"]
    assert advertised_addresses("::", 9, reached_on=["10.1.0.1", "fd00::5"], interface_ips=IFACES) == [
        ("fd00::5", 9),
        ("fd00:77::2", 9),
    ]


def test_interfaces_keep_loopback_when_alone() -> None:
    assert interface_hosts("0.0.0.0", ["127.0.0.1", "::1"]) == ["127.0.0.1"]


def test_advertise_override_wins() -> None:
    got = advertised_addresses("0.0.0.0", 52415, advertise=("203.0.113.5", 6000), interface_ips=IFACES)
    assert got == [("203.0.113.5", 6000)]


def test_specific_bind_is_advertised_as_is() -> None:
    assert advertised_addresses("10.77.0.2", 7, interface_ips=IFACES) == [("10.77.0.2", 7)]
    assert advertised_addresses("fd00::2", 7) == [("fd00::2", 7)]


def test_wildcard_bind_never_advertises_the_wildcard() -> None:
    got = advertised_addresses("0.0.0.0", 52415, interface_ips=["0.0.0.0", "127.0.0.1", "10.77.0.1"])
    assert got == [("10.77.0.1", 52415)]


def test_reached_on_comes_first_and_loopback_drops_out() -> None:
    got = advertised_addresses("0.0.0.0", 9, reached_on=["127.0.0.1", "10.1.0.1"], interface_ips=IFACES)
    assert got == [("10.1.0.1", 9), ("10.77.0.2", 9), ("169.254.3.4", 9)]


def test_ipv4_wildcard_ignores_ipv6_reached_on() -> None:
    got = advertised_addresses("0.0.0.0", 9, reached_on=["fd00::9", "::ffff:10.0.0.3"], interface_ips=IFACES)
    assert got == [("10.77.0.2", 9), ("169.254.3.4", 9)]


def test_only_loopback_host_advertises_loopback() -> None:
    assert advertised_addresses("0.0.0.0", 9, interface_ips=["127.0.0.1"]) == [("127.0.0.1", 9)]


def test_capabilities_round_trip_with_ipv6() -> None:
    addrs = [("10.0.0.1", 5), ("fd00::1", 5)]
    caps = ("mlx", *api_capabilities(addrs))
    assert caps == ("mlx", "api=10.0.0.1:5", "api=[fd00::1]:5")
    assert addresses_from_capabilities(caps) == addrs


def test_capabilities_from_an_old_node_with_a_wildcard_are_dropped() -> None:
    assert addresses_from_capabilities(("api=0.0.0.0:52415", "api=garbage", "api=10.0.0.2:1")) == [("10.0.0.2", 1)]


def test_dial_candidates_filter_unmap_and_dedupe() -> None:
    got = dial_candidates(
        [("::ffff:10.0.0.3", 7), ("0.0.0.0", 7)], [("10.0.0.3", 7), ("::", 7), ("10.0.0.4", 0), ("fd00::3", 7)]
    )
    assert got == [("10.0.0.3", 7), ("fd00::3", 7)]


def test_unmap() -> None:
    assert unmap("::ffff:192.0.2.1") == "192.0.2.1"
    assert unmap("fd00::1") == "fd00::1"
    assert unmap("host") == "host"
