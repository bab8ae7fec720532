"""Peer discovery: the TXT record and static peer parsing (pure), then real zeroconf on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo_stable.cluster.discovery import (
    MAX_CAPABILITIES,
    SERVICE_TYPE,
    DiscoveredPeer,
    Discovery,
    MalformedRecordError,
    PeerEvent,
    encode_properties,
    parse_peer,
    parse_properties,
    parse_static_peers,
    pick_host,
)

# ---------------------------------------------------------------------------------------------------------
# TXT properties
# ---------------------------------------------------------------------------------------------------------

node_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", fullmatch=True)
fingerprints = st.from_regex(r"[A-Za-z0-9._:+/=-]{0,64}", fullmatch=True)
capability = st.from_regex(r"[A-Za-z0-9_.:-]{1,32}", fullmatch=True)


def as_wire(props: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in props.items()}


def good_props(**overrides: bytes | None) -> dict[bytes, bytes | None]:
    props = as_wire(encode_properties("node-a", 52416, protocol_version=3, model_fingerprint="abc123"))
    for key, value in overrides.items():
        props[key.encode()] = value
    return props


@given(
    node_id=node_ids,
    port=st.integers(1, 65535),
    proto=st.integers(0, 2**31 - 1),
    fp=fingerprints,
    caps=st.lists(capability, max_size=MAX_CAPABILITIES, unique=True),
    mem=st.integers(0, 2**63 - 1),
)
def test_properties_round_trip(  # noqa: PLR0917 (hypothesis passes the drawn values)
    node_id: str, port: int, proto: int, fp: str, caps: list[str], mem: int
) -> None:
    props = encode_properties(
        node_id, port, protocol_version=proto, model_fingerprint=fp, capabilities=caps, memory_bytes=mem
    )
    assert all(len(k) + 1 + len(v.encode()) <= 255 for k, v in props.items())
    peer = parse_peer(as_wire(props), ["10.0.0.7"], port)
    assert peer == DiscoveredPeer(node_id, "10.0.0.7", port, proto, fp, tuple(caps), mem)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node_id": ""}, "node id"),
        ({"node_id": "-lead"}, "node id"),
        ({"node_id": "a.b"}, "node id"),
        ({"node_id": "x" * 64}, "node id"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"protocol_version": -1}, "protocol version"),
        ({"model_fingerprint": "has space"}, "fingerprint"),
        ({"model_fingerprint": "f" * 65}, "fingerprint"),
        ({"capabilities": ["a,b"]}, "capability"),
        ({"capabilities": [""]}, "capability"),
        ({"capabilities": ["a", "a"]}, "duplicate"),
        ({"capabilities": [f"c{i}" for i in range(MAX_CAPABILITIES + 1)]}, "at most"),
        ({"memory_bytes": -1}, "memory"),
        ({"memory_bytes": 2**63}, "memory"),
    ],
)
def test_encode_rejects_values_a_peer_would_reject(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"node_id": "node-a", "port": 52416, "protocol_version": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        encode_properties(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("props", "addresses", "srv_port", "reason"),
    [
        ({k: v for k, v in good_props().items() if k != b"id"}, ["10.0.0.1"], None, "missing required key 'id'"),
        ({k: v for k, v in good_props().items() if k != b"port"}, ["10.0.0.1"], None, "missing required key 'port'"),
        ({k: v for k, v in good_props().items() if k != b"proto"}, ["10.0.0.1"], None, "'proto'"),
        (good_props(id=None), ["10.0.0.1"], None, "'id' has no value"),
        (good_props(id=b""), ["10.0.0.1"], None, "invalid node id"),
        (good_props(id=b"bad id"), ["10.0.0.1"], None, "invalid node id"),
        (good_props(id="nöde".encode()), ["10.0.0.1"], None, "not ASCII"),
        (good_props(port=b"abc"), ["10.0.0.1"], None, "not a decimal integer"),
        (good_props(port=b"+1"), ["10.0.0.1"], None, "not a decimal integer"),
        (good_props(port=b" 1"), ["10.0.0.1"], None, "not a decimal integer"),
        (good_props(port=b"1_000"), ["10.0.0.1"], None, "not a decimal integer"),
        (good_props(port="١٢".encode()), ["10.0.0.1"], None, "not ASCII"),
        (good_props(port=b"0"), ["10.0.0.1"], None, "outside"),
        (good_props(port=b"70000"), ["10.0.0.1"], None, "outside"),
        (good_props(proto=b"-1"), ["10.0.0.1"], None, "not a decimal integer"),
        (good_props(proto=b"1.0"), ["10.0.0.1"], None, "not a decimal integer"),
        (good_props(proto=b"99999999999"), ["10.0.0.1"], None, "outside"),
        (good_props(mem=b"1e9"), ["10.0.0.1"], None, "not a decimal integer"),
        (good_props(mem=b"9" * 21), ["10.0.0.1"], None, "not a decimal integer"),
        (good_props(fp=b"a b"), ["10.0.0.1"], None, "fingerprint"),
        (good_props(caps=b"a,,b"), ["10.0.0.1"], None, "capability"),
        (good_props(caps=b"gpu,gpu"), ["10.0.0.1"], None, "duplicate"),
        (good_props(), ["10.0.0.1"], 52417, "SRV port 52417 differs"),
        (good_props(), [], None, "no usable unicast address"),
        (good_props(), ["224.0.0.251", "0.0.0.0", "garbage"], None, "no usable unicast address"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(
    props: dict[bytes, bytes | None],
    addresses: list[str],
    srv_port: int | None,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(MalformedRecordError, match=re.escape(reason)):
        parse_peer(props, addresses, srv_port)
    with caplog.at_level(logging.WARNING, logger="exo_stable.cluster.discovery"):
        assert parse_properties(props, addresses, srv_port) is None
    assert reason in caplog.text


def test_optional_keys_default_and_unknown_keys_are_ignored() -> None:
    props: dict[bytes, bytes | None] = {
        b"id": b"n1",
        b"port": b"52416",
        b"proto": b"2",
        b"future": b"\xff\xfe",
        b"flag": None,
        "clé".encode(): b"x",
    }
    assert parse_properties(props, ["192.168.1.9"], 52416) == DiscoveredPeer("n1", "192.168.1.9", 52416, 2, "", (), 0)


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (["fe80::1", "10.0.0.2"], "10.0.0.2"),
        (["127.0.0.1", "192.168.1.5"], "192.168.1.5"),
        (["fd00::2", "169.254.3.4"], "169.254.3.4"),
        (["fe80::1", "fd00::2"], "fd00::2"),
        (["::1"], "::1"),
        (["127.0.0.1"], "127.0.0.1"),
        (["not-an-ip", "10.1.1.1"], "10.1.1.1"),
    ],
)
def test_pick_host_prefers_routable_ipv4(addresses: list[str], expected: str) -> None:
    assert pick_host(addresses) == expected


# ---------------------------------------------------------------------------------------------------------
# Static peers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", []),
        ("   ", []),
        ("a:1", [("a", 1)]),
        ("mac-mini.local:52416,10.0.0.2:52417", [("mac-mini.local", 52416), ("10.0.0.2", 52417)]),
        (" [::1]:52416 , host:2 ", [("::1", 52416), ("host", 2)]),
        ("[fe80::1%eth0]:5", [("fe80::1%eth0", 5)]),
        ("[2001:DB8::1]:65535", [("2001:db8::1", 65535)]),
        ("h:1,h:1,g:2", [("h", 1), ("g", 2)]),
        ("fqdn.example.:80", [("fqdn.example.", 80)]),
    ],
)
def test_parse_static_peers(spec: str, expected: list[tuple[str, int]]) -> None:
    assert parse_static_peers(spec) == expected


@pytest.mark.parametrize(
    ("spec", "entry", "message"),
    [
        ("host", "entry 1 'host'", "missing ':port'"),
        ("::1:52416", "entry 1", "must be in brackets"),
        ("a:1,[::1]52416", "entry 2 '[::1]52416'", "missing ':port' after ']'"),
        ("[::1:5", "entry 1", "missing ']'"),
        ("[10.0.0.1]:5", "entry 1", "brackets are only for IPv6"),
        ("[]:5", "entry 1", "not a valid IPv6 address"),
        ("h:0", "entry 1 'h:0'", "outside 1-65535"),
        ("h:65536", "entry 1", "outside 1-65535"),
        ("h:abc", "entry 1", "not a number"),
        ("h:-1", "entry 1", "not a number"),
        ("h:", "entry 1", "not a number"),
        ("a:1,,b:2", "entry 2 ''", "empty entry"),
        ("a:1,", "entry 2", "empty entry"),
        (":5", "entry 1", "missing host"),
        ("bad_host:1", "entry 1", "not a valid host name"),
        ("-bad:1", "entry 1", "not a valid host name"),
        ("300.1.1.1:5", "entry 1", "not a valid IPv4 address"),
    ],
)
def test_parse_static_peers_errors_name_the_entry(spec: str, entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(entry) + ".*" + re.escape(message)):
        parse_static_peers(spec)


# ---------------------------------------------------------------------------------------------------------
# Real zeroconf on the loopback interface
# ---------------------------------------------------------------------------------------------------------

LOOPBACK = ["127.0.0.1"]
DEADLINE_S = 10.0


@functools.cache
def loopback_multicast_problem() -> str | None:
    """None when a multicast datagram sent out of 127.0.0.1 comes back to a member socket, else why not."""
    group = "224.0.0.251"
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        ):
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rx.bind(("", 0))
            port = rx.getsockname()[1]
            membership = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            tx.sendto(b"exo-stable-probe", (group, port))
            rx.settimeout(2.0)
            data, _ = rx.recvfrom(64)
    except OSError as exc:
        return f"multicast on 127.0.0.1 does not work here: {exc!r}"
    return None if data == b"exo-stable-probe" else f"multicast probe got {data!r}"


@pytest.fixture
def multicast() -> None:
    problem = loopback_multicast_problem()
    if problem is not None:
        pytest.skip(problem)


def unique_id(name: str) -> str:
    """Tests elsewhere on this host may browse the same service type: our peers get unique ids."""
    return f"{name}-{uuid.uuid4().hex[:10]}"


def make(name: str, port: int, **kwargs: object) -> Discovery:
    kwargs.setdefault("protocol_version", 1)
    return Discovery(unique_id(name), port, interfaces=LOOPBACK, **kwargs)  # type: ignore[arg-type]


async def wait_for_view(
    discovery: Discovery, done: Callable[[dict[str, DiscoveredPeer]], bool], deadline_s: float = DEADLINE_S
) -> list[PeerEvent]:
    """Read events until ``done(discovery.peers())`` holds; returns the events read. Fails past the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    events: list[PeerEvent] = []
    while not done(discovery.peers()):
        try:
            events.append(await discovery.next_event(max(0.0, end - loop.time())))
        except TimeoutError:
            pytest.fail(f"{discovery.node_id}: view {sorted(discovery.peers())} not reached; events {events}")
    return events


async def wait_for_event(
    discovery: Discovery, match: Callable[[PeerEvent], bool], deadline_s: float = DEADLINE_S
) -> list[PeerEvent]:
    """Read events up to and including the first that matches; returns them. Fails past the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    events: list[PeerEvent] = []
    while not events or not match(events[-1]):
        try:
            events.append(await discovery.next_event(max(0.0, end - loop.time())))
        except TimeoutError:
            pytest.fail(f"{discovery.node_id}: expected event not seen; events {events}")
    return events


def sees_all(node_ids: set[str], view: dict[str, DiscoveredPeer]) -> bool:
    return node_ids <= view.keys()


class Nodes:
    """Discovery instances of one test: started together, closed together (concurrently: each close sends
    goodbyes for about a quarter of a second)."""

    def __init__(self) -> None:
        self.started: list[Discovery] = []

    async def start(self, *nodes: Discovery) -> None:
        self.started.extend(nodes)
        await asyncio.gather(*(node.start() for node in nodes))

    async def close(self) -> None:
        await asyncio.gather(*(node.close() for node in self.started))


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    group = Nodes()
    try:
        yield group
    finally:
        await group.close()


@pytest.mark.usefixtures("multicast")
@pytest.mark.timeout(30)
async def test_nodes_find_each_other_and_see_one_leave(nodes: Nodes) -> None:
    a = make("a", 52001, model_fingerprint="fp-a", capabilities=["mlx", "gpu"], memory_bytes=8 << 30)
    b = make("b", 52002, model_fingerprint="fp-b", protocol_version=2)
    c = make("c", 52003)
    await nodes.start(a, b, c)
    ids = {a.node_id, b.node_id, c.node_id}

    seen: dict[str, list[PeerEvent]] = {}
    for node in (a, b, c):
        others = ids - {node.node_id}
        seen[node.node_id] = await wait_for_view(node, functools.partial(sees_all, others))
        assert node.node_id not in node.peers()

    assert b.peers()[a.node_id] == DiscoveredPeer(a.node_id, "127.0.0.1", 52001, 1, "fp-a", ("mlx", "gpu"), 8 << 30)
    assert a.peers()[b.node_id] == DiscoveredPeer(b.node_id, "127.0.0.1", 52002, 2, "fp-b", (), 0)
    assert a.peers()[c.node_id] == DiscoveredPeer(c.node_id, "127.0.0.1", 52003, 1, "", (), 0)
    assert c.peers()[a.node_id] == b.peers()[a.node_id]

    last_seen_c = {node.node_id: node.peers()[c.node_id] for node in (a, b)}
    await c.close()
    for node in (a, b):
        last_seen = last_seen_c[node.node_id]
        events = seen[node.node_id] + await wait_for_event(node, PeerEvent("lost", last_seen).__eq__)
        kinds = [e.kind for e in events if e.peer.node_id == c.node_id]
        assert kinds[0] == "found"
        assert "lost" not in kinds[:-1]
        assert c.node_id not in node.peers()
    assert {a.node_id, b.node_id} <= a.peers().keys() | {a.node_id}
    assert b.peers().keys() >= {a.node_id}
    assert c.peers() == {}
    assert c.statistics().state == "closed"


@pytest.mark.usefixtures("multicast")
@pytest.mark.timeout(30)
async def test_update_reaches_peers_as_updated_event(nodes: Nodes) -> None:
    a, b = make("a", 52011), make("b", 52012)
    await nodes.start(a, b)
    await wait_for_view(b, lambda view: a.node_id in view)

    await a.update(model_fingerprint="new-model", capabilities=["mlx"], memory_bytes=123)
    expected = DiscoveredPeer(a.node_id, "127.0.0.1", 52011, 1, "new-model", ("mlx",), 123)
    events = await wait_for_event(b, lambda e: e.peer.node_id == a.node_id and e.kind == "updated")
    assert events[-1].peer == expected
    assert b.peers()[a.node_id] == expected

    with pytest.raises(ValueError, match="fingerprint"):
        await a.update(model_fingerprint="not valid")


@pytest.mark.usefixtures("multicast")
@pytest.mark.timeout(30)
async def test_callback_mode_delivers_events_in_order(nodes: Nodes) -> None:
    got: list[PeerEvent] = []
    lost = asyncio.Event()
    b = make("b", 52022)

    def on_change(event: PeerEvent) -> None:
        if event.peer.node_id != b.node_id:
            return  # a node of another test run on this host
        got.append(event)
        if event.kind == "lost":
            lost.set()

    a = make("a", 52021, on_change=on_change)
    await nodes.start(a, b)
    with pytest.raises(RuntimeError, match="on_change"):
        await a.next_event(0.1)
    await wait_for_view(b, lambda view: a.node_id in view)
    await b.close()
    async with asyncio.timeout(DEADLINE_S):
        await lost.wait()
    assert [e.kind for e in got] == ["found", "lost"]
    assert got[0].peer.port == 52022


@pytest.mark.usefixtures("multicast")
@pytest.mark.timeout(30)
async def test_a_failing_callback_is_logged_not_raised(nodes: Nodes, caplog: pytest.LogCaptureFixture) -> None:
    called = asyncio.Event()

    def on_change(event: PeerEvent) -> None:
        called.set()
        raise ValueError("callback bug")

    a = make("a", 52031, on_change=on_change)
    b = make("b", 52032)
    with caplog.at_level(logging.ERROR, logger="exo_stable.cluster.discovery"):
        await nodes.start(a, b)
        async with asyncio.timeout(DEADLINE_S):
            await called.wait()
    assert "on_change callback failed" in caplog.text
    assert "callback bug" in caplog.text
    await wait_for_view(b, lambda view: a.node_id in view)
    assert a.statistics().state == "running"


@pytest.mark.usefixtures("multicast")
@pytest.mark.timeout(30)
async def test_second_node_with_the_same_id_is_refused(nodes: Nodes) -> None:
    a = make("a", 52041)
    await nodes.start(a)
    twin = Discovery(a.node_id, 52042, protocol_version=1, interfaces=LOOPBACK)
    b = make("b", 52043)
    refused, _ = await asyncio.gather(nodes.start(twin), nodes.start(b), return_exceptions=True)
    assert isinstance(refused, RuntimeError)
    assert "already advertised" in str(refused)
    assert twin.statistics().state == "closed"
    await wait_for_view(b, lambda view: a.node_id in view)
    assert b.peers()[a.node_id].port == 52041


@pytest.mark.usefixtures("multicast")
@pytest.mark.timeout(30)
async def test_malformed_record_on_the_network_is_ignored(nodes: Nodes, caplog: pytest.LogCaptureFixture) -> None:
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    watcher = make("watcher", 52051)
    await nodes.start(watcher)

    def service(node_id: str, props: dict[str, str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{node_id}.{SERVICE_TYPE}",
            port=52052,
            properties=props,
            server=f"{node_id}.raw.local.",
            parsed_addresses=["127.0.0.1"],
        )

    bad_id, good_id = unique_id("bad"), unique_id("good")
    async with AsyncZeroconf(interfaces=LOOPBACK) as raw:
        with caplog.at_level(logging.WARNING, logger="exo_stable.cluster.discovery"):
            # No probing (cooperating responders): each is announced at once, the bad one first.
            bad = service(bad_id, {"id": bad_id, "port": "52052", "proto": "one"})
            good = service(good_id, encode_properties(good_id, 52052, protocol_version=1, model_fingerprint="ok"))
            announced = [await raw.async_register_service(info, cooperating_responders=True) for info in (bad, good)]
            await wait_for_view(watcher, lambda view: good_id in view)
            await asyncio.gather(*announced)
    assert bad_id not in watcher.peers()
    assert watcher.statistics().malformed_records >= 1
    assert f"proto={'one'!r} is not a decimal integer" in caplog.text


@pytest.mark.usefixtures("multicast")
@pytest.mark.timeout(30)
async def test_lifecycle() -> None:
    never_started = make("idle", 52061)
    await never_started.close()
    await never_started.close()
    with pytest.raises(RuntimeError, match="cannot start"):
        await never_started.start()

    # A service type of its own: nothing else on this host can send it events.
    async with make("a", 52062, service_type=f"_xt-{uuid.uuid4().hex[:8]}._tcp.local.") as a:
        with pytest.raises(RuntimeError, match="cannot start"):
            await a.start()
        assert a.statistics().state == "running"
        with pytest.raises(TimeoutError):
            await a.next_event(0.05)
    assert a.statistics().state == "closed"
    await a.close()
    with pytest.raises(RuntimeError, match="not running"):
        await a.update(model_fingerprint="x")


def test_constructor_validates_what_it_would_advertise() -> None:
    with pytest.raises(ValueError, match="node id"):
        Discovery("bad id", 1, protocol_version=1)
    with pytest.raises(ValueError, match="max_events"):
        Discovery("ok", 1, protocol_version=1, max_events=0)
    with pytest.raises(ValueError, match="'eth0' is not an IP address"):
        Discovery("ok", 1, protocol_version=1, interfaces=["eth0"])


async def test_a_full_event_queue_drops_the_oldest_and_counts_it() -> None:
    discovery = Discovery("me", 1, protocol_version=1, max_events=2)
    peers = [DiscoveredPeer(f"p{i}", "10.0.0.1", 1, 1, "", (), 0) for i in range(3)]
    for peer in peers:
        discovery._emit(PeerEvent("found", peer))  # the one place events enter the queue
    assert discovery.statistics().events_dropped == 1
    assert [await discovery.next_event(0.1) for _ in range(2)] == [PeerEvent("found", p) for p in peers[1:]]
