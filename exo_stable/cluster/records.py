"""What a node says about itself over mDNS, and which peers it is told to dial: pure, no IO.

A node's DNS-SD TXT record carries what a peer needs before it dials (node id, HTTP/wire port, protocol
version, model fingerprint, capabilities, memory). :func:`encode_properties` / :func:`parse_properties`
write and read it, validated both ways: a malformed record from the network is rejected with a reason
(:class:`MalformedRecordError`), never raised at the caller of :class:`~exo_stable.cluster.discovery.Discovery`.
:func:`parse_static_peers` reads the ``--peers host:port,…`` list. The peer and event types that
discovery reports live here too.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("exo_stable.cluster.discovery")  # records are logged as discovery's, as before

SERVICE_TYPE = "_exo-stable._tcp.local."

MAX_NODE_ID_LEN = 63
"""A DNS-SD instance name is one DNS label: at most 63 bytes."""
MAX_FINGERPRINT_LEN = 64
MAX_CAPABILITY_LEN = 32
MAX_CAPABILITIES = 16
MAX_PROTOCOL_VERSION = 2**31 - 1
MAX_MEMORY_BYTES = 2**63 - 1
MAX_TXT_ENTRY_BYTES = 255
"""RFC 6763 §6.1: each ``key=value`` string of a TXT record is at most 255 bytes."""

_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_FINGERPRINT_RE = re.compile(r"[A-Za-z0-9._:+/=-]{0,64}")
_CAPABILITY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,32}")
_DIGITS_RE = re.compile(r"[0-9]{1,20}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


# ---------------------------------------------------------------------------------------------------------
# Peers and events
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscoveredPeer:
    """What a node advertises about itself, as seen by the others."""

    node_id: str
    host: str
    """The address to dial: IPv4 preferred, IPv6 without brackets."""
    port: int
    protocol_version: int
    model_fingerprint: str
    capabilities: tuple[str, ...]
    memory_bytes: int


PeerEventKind = Literal["found", "updated", "lost"]


@dataclass(frozen=True)
class PeerEvent:
    """A change in the view: a peer appeared, changed what it advertises, or left."""

    kind: PeerEventKind
    peer: DiscoveredPeer
    """For ``lost``, the peer as it was last seen."""


class MalformedRecordError(ValueError):
    """A TXT record (or the addresses that came with it) that does not describe a valid peer."""


# ---------------------------------------------------------------------------------------------------------
# TXT properties (pure)
# ---------------------------------------------------------------------------------------------------------


def _check_node_id(node_id: str) -> str:
    if not _NODE_ID_RE.fullmatch(node_id):
        raise ValueError(
            f"node id {node_id!r} must be 1-{MAX_NODE_ID_LEN} characters of letters, digits, '_' and '-',"
            " starting with a letter or digit"
        )
    return node_id


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_fingerprint(fingerprint: str) -> str:
    if not _FINGERPRINT_RE.fullmatch(fingerprint):
        raise ValueError(
            f"model fingerprint {fingerprint!r} must be at most {MAX_FINGERPRINT_LEN} characters of"
            " letters, digits and ._:+/=-"
        )
    return fingerprint


def _check_capabilities(capabilities: Iterable[str]) -> tuple[str, ...]:
    caps = tuple(capabilities)
    if len(caps) > MAX_CAPABILITIES:
        raise ValueError(f"at most {MAX_CAPABILITIES} capabilities, got {len(caps)}")
    for cap in caps:
        if not isinstance(cap, str) or not _CAPABILITY_RE.fullmatch(cap):
            raise ValueError(
                f"capability {cap!r} must be 1-{MAX_CAPABILITY_LEN} characters of letters, digits and _.:-"
            )
    if len(set(caps)) != len(caps):
        raise ValueError(f"duplicate capabilities in {caps!r}")
    return caps


def encode_properties(
    node_id: str,
    port: int,
    *,
    protocol_version: int,
    model_fingerprint: str = "",
    capabilities: Iterable[str] = (),
    memory_bytes: int = 0,
) -> dict[str, str]:
    """The TXT properties a node advertises. Raises ValueError for a value a peer would reject."""
    props = {
        "id": _check_node_id(node_id),
        "port": str(_check_int("port", port, 1, 65535)),
        "proto": str(_check_int("protocol version", protocol_version, 0, MAX_PROTOCOL_VERSION)),
        "fp": _check_fingerprint(model_fingerprint),
        "caps": ",".join(_check_capabilities(capabilities)),
        "mem": str(_check_int("memory bytes", memory_bytes, 0, MAX_MEMORY_BYTES)),
    }
    for key, value in props.items():
        size = len(key) + 1 + len(value.encode())
        if size > MAX_TXT_ENTRY_BYTES:
            raise ValueError(f"TXT entry {key!r} is {size} bytes, more than {MAX_TXT_ENTRY_BYTES}")
    return props


def _text_field(fields: Mapping[str, str], key: str, *, required: bool) -> str | None:
    value = fields.get(key)
    if value is None and required:
        raise MalformedRecordError(f"missing required key {key!r}")
    return value


def _int_field(fields: Mapping[str, str], key: str, low: int, high: int, *, default: int | None = None) -> int:
    text = _text_field(fields, key, required=default is None)
    if text is None:
        assert default is not None
        return default
    if not _DIGITS_RE.fullmatch(text):
        raise MalformedRecordError(f"{key}={text!r} is not a decimal integer")
    value = int(text)
    if not low <= value <= high:
        raise MalformedRecordError(f"{key}={value} is outside [{low}, {high}]")
    return value


def _decode_fields(props: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """Keys and values as ASCII text; keys we do not know are ignored (newer peers may add some)."""
    known = {"id", "port", "proto", "fp", "caps", "mem"}
    fields: dict[str, str] = {}
    for raw_key, raw_value in props.items():
        try:
            key = raw_key.decode("ascii")
        except (UnicodeDecodeError, AttributeError):
            continue
        if key not in known:
            continue
        if raw_value is None:
            raise MalformedRecordError(f"key {key!r} has no value")
        try:
            fields[key] = raw_value.decode("ascii")
        except (UnicodeDecodeError, AttributeError):
            raise MalformedRecordError(f"value of {key!r} is not ASCII text: {raw_value!r}") from None
    return fields


def pick_host(addresses: Iterable[str]) -> str:
    """The address to dial among those advertised: IPv4 before IPv6, routable before link-local and loopback.

    Raises MalformedRecordError when none is a usable unicast address.
    """
    candidates: list[tuple[tuple[bool, bool, bool], int, str]] = []
    for index, text in enumerate(addresses):
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            log.debug("ignoring unparsable address %r", text)
            continue
        if addr.is_unspecified or addr.is_multicast:
            continue
        rank = (addr.version == 6, addr.is_link_local, addr.is_loopback)
        candidates.append((rank, index, str(addr)))
    if not candidates:
        raise MalformedRecordError(f"no usable unicast address in {list(addresses)!r}")
    return min(candidates)[2]


def parse_peer(props: Mapping[bytes, bytes | None], addresses: Sequence[str], port: int | None) -> DiscoveredPeer:
    """Validate a TXT record plus the addresses and SRV port that came with it.

    ``port`` is the SRV record's port (None when unknown); when given it must agree with the TXT ``port``.
    Raises MalformedRecordError with the reason.
    """
    fields = _decode_fields(props)
    node_id = _text_field(fields, "id", required=True)
    assert node_id is not None
    if not _NODE_ID_RE.fullmatch(node_id):
        raise MalformedRecordError(f"invalid node id {node_id!r}")
    txt_port = _int_field(fields, "port", 1, 65535)
    if port is not None and port != txt_port:
        raise MalformedRecordError(f"SRV port {port} differs from TXT port {txt_port}")
    protocol_version = _int_field(fields, "proto", 0, MAX_PROTOCOL_VERSION)
    memory_bytes = _int_field(fields, "mem", 0, MAX_MEMORY_BYTES, default=0)
    fingerprint = fields.get("fp", "")
    if not _FINGERPRINT_RE.fullmatch(fingerprint):
        raise MalformedRecordError(f"invalid model fingerprint {fingerprint!r}")
    caps_text = fields.get("caps", "")
    try:
        capabilities = _check_capabilities(caps_text.split(",") if caps_text else ())
    except ValueError as exc:
        raise MalformedRecordError(str(exc)) from None
    return DiscoveredPeer(
        node_id=node_id,
        host=pick_host(addresses),
        port=txt_port,
        protocol_version=protocol_version,
        model_fingerprint=fingerprint,
        capabilities=capabilities,
        memory_bytes=memory_bytes,
    )


def parse_properties(
    props: Mapping[bytes, bytes | None], addresses: Sequence[str], port: int | None
) -> DiscoveredPeer | None:
    """:func:`parse_peer` for records from the network: a malformed one is logged (with the reason) and
    gives None."""
    try:
        return parse_peer(props, addresses, port)
    except MalformedRecordError as exc:
        shown = repr(dict(props))
        if len(shown) > 300:
            shown = shown[:300] + "…"
        log.warning("ignoring malformed discovery record %s (addresses %r): %s", shown, list(addresses), exc)
        return None


# ---------------------------------------------------------------------------------------------------------
# Static peers (pure)
# ---------------------------------------------------------------------------------------------------------


def _parse_port(text: str) -> int:
    if not _DIGITS_RE.fullmatch(text):
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    return port


def _check_hostname(host: str) -> str:
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    name = host.removesuffix(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{host!r} is not a valid host name")
    return host


def _parse_host_port(entry: str) -> tuple[str, int]:
    if not entry:
        raise ValueError("empty entry")
    if entry.startswith("["):
        close = entry.find("]")
        if close < 0:
            raise ValueError("missing ']' after the IPv6 address")
        inner, rest = entry[1:close], entry[close + 1 :]
        try:
            addr = ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{inner!r} is not a valid IPv6 address (brackets are only for IPv6)") from None
        if not rest.startswith(":"):
            raise ValueError("missing ':port' after ']'")
        return str(addr), _parse_port(rest[1:])
    colons = entry.count(":")
    if colons == 0:
        raise ValueError("missing ':port'")
    if colons > 1:
        raise ValueError("an IPv6 address must be in brackets, e.g. [::1]:52416")
    host, port_text = entry.rsplit(":", 1)
    if not host:
        raise ValueError("missing host")
    return _check_hostname(host), _parse_port(port_text)


def parse_static_peers(spec: str) -> list[tuple[str, int]]:
    """Parse ``--peers host:port,host:port`` (IPv6 as ``[::1]:52416``) into ``(host, port)`` pairs.

    Whitespace around entries is ignored and repeated entries are kept once, in first-seen order; an
    empty spec gives no peers. Raises ValueError naming the first bad entry.
    """
    if not spec.strip():
        return []
    peers: list[tuple[str, int]] = []
    for index, raw in enumerate(spec.split(","), start=1):
        try:
            peer = _parse_host_port(raw.strip())
        except ValueError as exc:
            raise ValueError(f"--peers entry {index} {raw.strip()!r}: {exc}") from None
        if peer not in peers:
            peers.append(peer)
    return peers
