"""Which addresses a node advertises and gossips, and how its peers choose one to dial. Pure, no IO.

A node bound to a wildcard (``0.0.0.0`` or ``::``) must never tell anyone to dial the wildcard: a peer that
dials ``0.0.0.0`` reaches itself. So a node advertises, in this order: ``--advertise host[:port]`` when
given; else the address it is bound to when that is a specific one; else the addresses peers have reached it
on (the local end of their connections, learnt as they connect) followed by its interfaces' addresses
(routable before link-local, loopback only when there is nothing else).

Addresses are ``(host, port)`` pairs with IPv6 hosts kept without brackets; :func:`format_host_port`
writes them as ``host:port`` or ``[v6]:port`` for URLs and capabilities.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Sequence

API_CAPABILITY = "api="
"""A capability ``api=HOST:PORT`` names an address the node's API and wire route answer on (first: preferred)."""
MAX_ADVERTISED = 8
"""At most this many addresses per node in capabilities and gossip (a handshake and a message stay small)."""

Address = tuple[str, int]


def is_wildcard(host: str) -> bool:
    """``0.0.0.0``, ``::`` or an empty host: binds every interface, reaches no particular one."""
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def is_dialable(host: str) -> bool:
    """A host a peer may dial: a name, or a unicast IP address that is not a wildcard."""
    if is_wildcard(host):
        return False
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return bool(host)  # a host name; resolution is the dialer's business
    return not addr.is_multicast


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: str, default_port: int | None = None) -> Address:
    """``host``, ``host:port``, ``v6``, ``[v6]`` or ``[v6]:port``; raises ValueError naming what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        _check_ip(host, 6, text)
        if not rest:
            port = default_port
        elif rest.startswith(":"):
            port = _port(rest[1:], text)
        else:
            raise ValueError(f"{text!r}: expected ':port' after ']'")
    elif text.count(":") > 1:  # a bare IPv6 address, no port
        host, port = text, default_port
        _check_ip(host, 6, text)
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
        port = _port(port_text, text)
    else:
        host, port = text, default_port
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if port is None:
        raise ValueError(f"{text!r}: missing port")
    if is_wildcard(host):
        raise ValueError(f"{text!r} is a wildcard address: peers cannot dial it; give an address they can reach")
    with contextlib.suppress(ValueError):  # a host name stays as given
        host = str(ipaddress.ip_address(host))
    return host, port


def _check_ip(host: str, version: int, text: str) -> None:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not a valid IPv{version} address") from None
    if addr.version != version:
        raise ValueError(f"{text!r}: {host!r} is not an IPv{version} address")


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: port {text!r} is not a number in 1-65535")
    return int(text)


def _rank(host: str) -> tuple[int, int, int]:
    """Sort key: routable before link-local before loopback, IPv4 before IPv6, names last-but-routable."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return (0, 0, 0)
    return (int(addr.is_loopback), int(addr.is_link_local), int(addr.version == 6))


def interface_hosts(bind_host: str, interface_ips: Iterable[str]) -> list[str]:
    """The interface addresses a node bound to ``bind_host`` can be reached on, best first.

    ``0.0.0.0`` reaches IPv4 interfaces, ``::`` IPv6 ones (asyncio's servers set IPV6_V6ONLY); loopback is
    kept only when nothing else is (a peer on another machine cannot use it). IPv6 link-local addresses are
    left out: without a zone index they cannot be dialed.
    """
    families = {6} if ":" in bind_host else {4}
    hosts: list[str] = []
    for text in interface_ips:
        try:
            addr = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if addr.version not in families or addr.is_unspecified or addr.is_multicast:
            continue
        if addr.version == 6 and addr.is_link_local:
            continue
        if str(addr) not in hosts:
            hosts.append(str(addr))
    routable = [h for h in hosts if not ipaddress.ip_address(h).is_loopback]
    chosen = routable or hosts
    return sorted(chosen, key=lambda h: (_rank(h), chosen.index(h)))


def advertised_addresses(
    bind_host: str,
    port: int,
    *,
    advertise: Address | None = None,
    reached_on: Sequence[str] = (),
    interface_ips: Iterable[str] = (),
) -> list[Address]:
    """What this node tells peers to dial, best first, never a wildcard (see the module's docstring).

    ``reached_on``: local addresses of connections peers made to this node, most recent first.
    """
    if advertise is not None:
        return [advertise]
    if not is_wildcard(bind_host):
        return [(bind_host, port)]
    hosts = [h for h in reached_on if is_dialable(h) and not _is_v4_mapped(h)]
    hosts += interface_hosts(bind_host, interface_ips)
    unique = list(dict.fromkeys(hosts))
    unique = [h for h in unique if (":" in h) == (":" in bind_host) or not _is_ip(h)]
    routable = [h for h in unique if _rank(h)[0] == 0]
    return [(h, port) for h in (routable or unique)[:MAX_ADVERTISED]]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_v4_mapped(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None


def unmap(host: str) -> str:
    """``::ffff:10.0.0.1`` (an IPv4 peer on a dual-stack socket) as ``10.0.0.1``; anything else unchanged."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return host


def api_capabilities(addresses: Sequence[Address]) -> tuple[str, ...]:
    """The ``api=HOST:PORT`` capabilities for ``addresses`` (at most :data:`MAX_ADVERTISED`)."""
    return tuple(API_CAPABILITY + format_host_port(h, p) for h, p in addresses[:MAX_ADVERTISED])


def addresses_from_capabilities(capabilities: Iterable[str]) -> list[Address]:
    """The dialable addresses a peer's ``api=`` capabilities name, in its order; malformed ones are skipped."""
    found: list[Address] = []
    for cap in capabilities:
        if not cap.startswith(API_CAPABILITY):
            continue
        try:
            address = parse_host_port(cap.removeprefix(API_CAPABILITY))
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    return found[:MAX_ADVERTISED]


def dial_candidates(*groups: Iterable[Address]) -> list[Address]:
    """Every dialable address of ``groups``, in order, each once, at most :data:`MAX_ADVERTISED`."""
    out: list[Address] = []
    for group in groups:
        for raw, port in group:
            host = unmap(raw)
            if is_dialable(host) and 0 < port < 65536 and (host, port) not in out:
                out.append((host, port))
    return out[:MAX_ADVERTISED]


__all__ = [
    "API_CAPABILITY",
    "MAX_ADVERTISED",
    "Address",
    "addresses_from_capabilities",
    "advertised_addresses",
    "api_capabilities",
    "dial_candidates",
    "format_host_port",
    "interface_hosts",
    "is_dialable",
    "is_wildcard",
    "parse_host_port",
    "unmap",
]
