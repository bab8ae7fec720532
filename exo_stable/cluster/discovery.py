"""Peer discovery over mDNS/DNS-SD (zeroconf), plus the ``--peers host:port,…`` static list.

Each node advertises one instance of :data:`SERVICE_TYPE`, named after its node id, whose TXT record
carries what a peer needs before it dials: the node id, the HTTP/wire port (the same port serves the
OpenAI API and the peer websocket), the protocol version, the model fingerprint, capabilities and
memory. :class:`Discovery` browses for the others and keeps a current view of them.

The TXT record codec, the ``--peers`` parser and the peer/event types are pure and live in
:mod:`exo_stable.cluster.records`. :class:`Discovery` is the asyncio part: zeroconf's browser calls back on
the event loop; each added/updated service is resolved by a task this object owns (one per service name, at
most one at a time, re-run when the service changed while it was resolving), with a deadline. ``close()``
cancels and awaits them, sends goodbye packets and shuts zeroconf down, each step with a deadline.

Events (``found``, ``updated``, ``lost``) are delivered in order through exactly one channel, chosen at
construction: the ``on_change`` callback if one is given, otherwise a bounded queue read with
:meth:`Discovery.next_event`. When the queue is full the oldest event is dropped (counted in
:meth:`Discovery.statistics` and logged); :meth:`Discovery.peers` is always the authoritative view to
resynchronise from.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Literal, Self

from zeroconf import InterfaceChoice, IPVersion, NonUniqueNameException, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from exo_stable.cluster.records import (
    MAX_CAPABILITIES,
    SERVICE_TYPE,
    DiscoveredPeer,
    MalformedRecordError,
    PeerEvent,
    PeerEventKind,
    encode_properties,
    parse_peer,
    parse_properties,
    parse_static_peers,
    pick_host,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Discovery (asyncio + zeroconf)
# ---------------------------------------------------------------------------------------------------------


def _local_ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses to advertise when listening on all interfaces (loopback only if alone)."""
    import ifaddr  # zeroconf's own dependency for enumerating interfaces

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in found:
                found.append(ip.ip)
    routable = [a for a in found if not ipaddress.IPv4Address(a).is_loopback]
    return routable or found or ["127.0.0.1"]


DiscoveryState = Literal["new", "starting", "running", "closing", "closed"]


@dataclass(frozen=True)
class DiscoveryStatistics:
    """A snapshot of a :class:`Discovery` for health pages."""

    state: DiscoveryState
    peers: int
    resolving: int
    events_queued: int
    events_dropped: int
    malformed_records: int
    """Records rejected by :func:`parse_properties`, or naming another node id than their instance name."""
    resolve_failures: int
    """Services whose details did not arrive within the resolve deadline."""


class Discovery:
    """Advertise this node over mDNS and keep a view of the other nodes advertising the same service.

    ``interfaces``: the addresses zeroconf binds and advertises (e.g. ``["127.0.0.1"]`` in tests); None means
    all interfaces (IPv4, and IPv6 too with ``ipv6``), advertising this host's IPv4 addresses.
    ``addresses``: advertise these instead (e.g. a node's ``--advertise`` address).
    ``on_change``: if given, every event is
    passed to it (synchronously, on the event loop; an exception it raises is logged) and
    :meth:`next_event` is unavailable; otherwise events queue up (at most ``max_events``) for
    :meth:`next_event`.
    """

    def __init__(
        self,
        node_id: str,
        port: int,
        *,
        protocol_version: int,
        model_fingerprint: str = "",
        capabilities: Iterable[str] = (),
        memory_bytes: int = 0,
        interfaces: list[str] | None = None,
        addresses: list[str] | None = None,
        ipv6: bool = False,
        on_change: Callable[[PeerEvent], None] | None = None,
        max_events: int = 256,
        resolve_timeout_s: float = 3.0,
        start_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
        record_ttl_s: int = 120,
        service_type: str = SERVICE_TYPE,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self._node_id = node_id
        self._port = port
        self._protocol_version = protocol_version
        # Validates every field now, so a bad configuration fails at construction, not on the network.
        self._properties = encode_properties(
            node_id,
            port,
            protocol_version=protocol_version,
            model_fingerprint=model_fingerprint,
            capabilities=capabilities,
            memory_bytes=memory_bytes,
        )
        if interfaces is not None:
            for address in interfaces:
                try:
                    ipaddress.ip_address(address)
                except ValueError:
                    raise ValueError(f"interface {address!r} is not an IP address") from None
        self._interfaces = list(interfaces) if interfaces is not None else None
        for address in addresses or ():
            ipaddress.ip_address(address)  # ValueError for a name: records carry addresses
        self._addresses = list(addresses) if addresses else None
        self._ipv6 = ipv6
        self._on_change = on_change
        self._events: asyncio.Queue[PeerEvent] = asyncio.Queue(maxsize=max_events)
        self._resolve_timeout_s = resolve_timeout_s
        self._start_timeout_s = start_timeout_s
        self._close_timeout_s = close_timeout_s
        self._record_ttl_s = record_ttl_s
        self._service_type = service_type
        self._instance_name = f"{node_id}.{service_type}"

        self._state: DiscoveryState = "new"
        self._aiozc: Any = None
        self._browser: Any = None
        self._announce: asyncio.Future[Any] | None = None
        self._peers: dict[str, DiscoveredPeer] = {}
        self._advertised_addresses: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        """Every resolver task this object started and has not yet seen finish (close() awaits them)."""
        self._resolvers: dict[str, asyncio.Task[None]] = {}
        """The current resolver per service name."""
        self._stale: set[str] = set()
        """Service names that changed while their resolver was running: resolve them again."""
        self._events_dropped = 0
        self._malformed = 0
        self._resolve_failures = 0

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def node_id(self) -> str:
        return self._node_id

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind, start browsing and register this node (probing for a unique name), within the start deadline.

        Raises RuntimeError if another node already advertises this node id, TimeoutError past the deadline;
        on any failure everything opened so far is closed again.
        """
        if self._state != "new":
            raise RuntimeError(f"Discovery for {self._node_id!r} cannot start: it is {self._state}")
        self._state = "starting"
        try:
            async with asyncio.timeout(self._start_timeout_s):
                await self._start()
        except BaseException:
            await self._shutdown()
            raise
        self._state = "running"
        log.info("discovery started for %s on port %d", self._node_id, self._port)

    async def _start(self) -> None:
        if self._interfaces is None:
            version = IPVersion.All if self._ipv6 else IPVersion.V4Only
            self._aiozc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=version)
            addresses = _local_ipv4_addresses()
        else:
            self._aiozc = AsyncZeroconf(interfaces=self._interfaces)
            addresses = [a for a in self._interfaces if not ipaddress.ip_address(a).is_unspecified]
        self._advertised_addresses = self._addresses or addresses
        # Browse before registering so peers that answer our probes are not missed.
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, self._service_type, handlers=[self._on_service_state_change]
        )
        try:
            announce = await self._aiozc.async_register_service(self._service_info())
        except NonUniqueNameException:
            raise RuntimeError(f"node id {self._node_id!r} is already advertised by another node") from None
        self._announce = announce

    def _service_info(self) -> Any:
        return AsyncServiceInfo(
            self._service_type,
            self._instance_name,
            port=self._port,
            properties=self._properties,
            server=f"{self._node_id}.exo-stable.local.",
            host_ttl=self._record_ttl_s,
            other_ttl=self._record_ttl_s,
            parsed_addresses=self._advertised_addresses,
        )

    async def update(
        self,
        *,
        model_fingerprint: str | None = None,
        capabilities: Iterable[str] | None = None,
        memory_bytes: int | None = None,
    ) -> None:
        """Change what this node advertises (e.g. after loading another model) and announce it."""
        if self._state != "running":
            raise RuntimeError(f"Discovery for {self._node_id!r} is {self._state}, not running")
        props = self._properties
        self._properties = encode_properties(
            self._node_id,
            self._port,
            protocol_version=self._protocol_version,
            model_fingerprint=props["fp"] if model_fingerprint is None else model_fingerprint,
            capabilities=(props["caps"].split(",") if props["caps"] else ()) if capabilities is None else capabilities,
            memory_bytes=int(props["mem"]) if memory_bytes is None else memory_bytes,
        )
        async with asyncio.timeout(self._start_timeout_s):
            broadcast = await self._aiozc.async_update_service(self._service_info())
            await broadcast

    async def close(self) -> None:
        """Stop browsing, cancel resolvers, send goodbyes and release the sockets; each step has a deadline.

        Idempotent. The view is emptied without ``lost`` events: this node stopped looking, the peers did
        not leave.
        """
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        await self._shutdown()
        log.info("discovery closed for %s", self._node_id)

    async def _shutdown(self) -> None:
        self._state = "closing"
        if self._browser is not None:
            browser, self._browser = self._browser, None
            await browser.async_cancel()
        owned: list[asyncio.Future[Any]] = list(self._tasks)
        self._resolvers.clear()
        self._stale.clear()
        announce, self._announce = self._announce, None
        if announce is not None:
            owned.append(announce)
        for fut in owned:
            fut.cancel()
        if owned:
            _done, pending = await asyncio.wait(owned, timeout=self._close_timeout_s)
            if pending:
                log.error("discovery: %d task(s) did not stop within %.1fs", len(pending), self._close_timeout_s)
        # Resolver failures are logged by their done callback; the announcement's here.
        if announce is not None and announce.done() and not announce.cancelled() and announce.exception():
            log.error("discovery: announcing %s failed", self._instance_name, exc_info=announce.exception())
        if self._aiozc is not None:
            aiozc, self._aiozc = self._aiozc, None
            try:
                # Unregisters (goodbye packets, so peers see us leave at once) and closes the sockets.
                async with asyncio.timeout(self._close_timeout_s):
                    await aiozc.async_close()
            except TimeoutError:
                log.error("discovery: zeroconf did not close within %.1fs", self._close_timeout_s)
        self._peers.clear()
        self._state = "closed"

    # ------------------------------------------------------------------------------------------ the view

    def peers(self) -> dict[str, DiscoveredPeer]:
        """The peers currently advertising, by node id (a copy; this node is never in it)."""
        return dict(self._peers)

    async def next_event(self, timeout: float) -> PeerEvent:  # noqa: ASYNC109 (deadline is mandatory)
        """The next event, in order; raises TimeoutError if none arrives within ``timeout`` seconds."""
        if self._on_change is not None:
            raise RuntimeError("events go to the on_change callback; next_event is not available")
        async with asyncio.timeout(timeout):
            return await self._events.get()

    def statistics(self) -> DiscoveryStatistics:
        """A snapshot for health pages."""
        return DiscoveryStatistics(
            state=self._state,
            peers=len(self._peers),
            resolving=len(self._tasks),
            events_queued=self._events.qsize(),
            events_dropped=self._events_dropped,
            malformed_records=self._malformed,
            resolve_failures=self._resolve_failures,
        )

    # ------------------------------------------------------------------------------------------ internals

    def _emit(self, event: PeerEvent) -> None:
        log.info("discovery %s: peer %s %s at %s:%d", self._node_id, event.peer.node_id, event.kind,
                 event.peer.host, event.peer.port)  # fmt: skip
        if self._on_change is not None:
            try:
                self._on_change(event)
            except Exception:
                log.exception("discovery on_change callback failed for %s", event)
            return
        if self._events.full():
            dropped = self._events.get_nowait()
            self._events_dropped += 1
            log.warning("discovery event queue full (%d): dropped %s", self._events.maxsize, dropped)
        self._events.put_nowait(event)

    def _label(self, name: str) -> str | None:
        suffix = "." + self._service_type
        if not name.endswith(suffix):
            return None
        return name[: -len(suffix)]

    def _on_service_state_change(
        self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """zeroconf's browser callback (on the event loop): must not block, must not raise."""
        try:
            if self._state not in ("starting", "running") or name == self._instance_name:
                return
            if state_change is ServiceStateChange.Removed:
                self._forget(name)
            else:
                self._schedule_resolve(name)
        except Exception:
            log.exception("discovery: handling %s for %s failed", state_change, name)

    def _schedule_resolve(self, name: str) -> None:
        running = self._resolvers.get(name)
        if running is not None and not running.done():
            self._stale.add(name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name), name=f"discovery-resolve:{name}")
        self._resolvers[name] = task
        self._tasks.add(task)
        task.add_done_callback(partial(self._resolver_done, name))

    def _resolver_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._resolvers.get(name) is task:
            del self._resolvers[name]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("discovery: resolving %s failed", name, exc_info=exc)

    async def _resolve(self, name: str) -> None:
        while True:
            self._stale.discard(name)
            info = AsyncServiceInfo(self._service_type, name)
            timeout_ms = int(self._resolve_timeout_s * 1000)
            # async_request has its own deadline; the outer one guards against it ever overrunning.
            async with asyncio.timeout(self._resolve_timeout_s + 1.0):
                resolved = await info.async_request(self._aiozc.zeroconf, timeout_ms)
            if resolved:
                self._apply(name, info)
            else:
                self._resolve_failures += 1
                log.warning("discovery: could not resolve %s within %.1fs", name, self._resolve_timeout_s)
            if name not in self._stale:
                return

    def _apply(self, name: str, info: Any) -> None:
        addresses: list[str] = list(info.parsed_addresses())
        peer = parse_properties(info.properties or {}, addresses, info.port)
        if peer is None:
            self._malformed += 1
            return
        label = self._label(name)
        if peer.node_id != label:
            self._malformed += 1
            log.warning("discovery: ignoring %s: it advertises node id %r", name, peer.node_id)
            return
        if peer.node_id == self._node_id:
            log.warning("discovery: another node advertises this node's id %r at %s", peer.node_id, peer.host)
            return
        old = self._peers.get(peer.node_id)
        if old == peer:
            return
        self._peers[peer.node_id] = peer
        self._emit(PeerEvent("found" if old is None else "updated", peer))

    def _forget(self, name: str) -> None:
        task = self._resolvers.pop(name, None)
        if task is not None:
            task.cancel()
        self._stale.discard(name)
        label = self._label(name)
        peer = self._peers.pop(label, None) if label is not None else None
        if peer is not None:
            self._emit(PeerEvent("lost", peer))


__all__ = [
    "MAX_CAPABILITIES",
    "SERVICE_TYPE",
    "DiscoveredPeer",
    "Discovery",
    "DiscoveryState",
    "DiscoveryStatistics",
    "MalformedRecordError",
    "PeerEvent",
    "PeerEventKind",
    "encode_properties",
    "parse_peer",
    "parse_properties",
    "parse_static_peers",
    "pick_host",
]
