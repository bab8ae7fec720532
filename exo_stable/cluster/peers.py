"""PeerManager: every link of this node, one router for outgoing messages, one dispatcher for incoming.

This is the design's ``ReliableMessageTransport``: a node's links behind one send/receive API. :meth:`send`
queues a message on a reliable link (per-frame CRC32, sequence numbers, acks and retransmission in
``wire/peerlink.py``); what arrives is handed, in order, to the node's dispatcher (receiving is pushed, not
polled). The end-to-end checks run where a message is used (``exo_stable/wire/__init__.py`` says where).

Each node dials the peers it knows (static ``--peers`` or discovered) and accepts the peers that dial it.
A pair of nodes that know each other therefore holds two links; a message to a peer goes over the link this
node dialed when it is up, else over the one the peer dialed. Messages to this node itself are dispatched
in process, never through a socket. Every link task (delivery pump, membership watcher) is owned by the
manager's TaskGroup; a peer shows up when a link to it completes the handshake and goes down when no link
to it is connected any more.

State is bounded: a peer gets a link only once it passed the handshake (wire/server.py), and a peer that
has been down for ``forget_after_s`` leaves nothing behind (its links, their tasks, its entry, its health
record), except a link to an address this node was told to keep dialing (``--peers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from exo_stable.cluster.addresses import Address, format_host_port, unmap
from exo_stable.logs import safe
from exo_stable.wire.handshake import Identity, PeerInfo
from exo_stable.wire.health import NetworkHealthMonitor
from exo_stable.wire.linkconfig import PeersStatistics, PeerStatistics
from exo_stable.wire.messages import Hello, Message
from exo_stable.wire.peerlink import WIRE_PATH, LinkClosed, LinkConfig, PeerLink
from exo_stable.wire.server import WireServer

log = logging.getLogger(__name__)


class Inbound(Protocol):
    """Where a running manager delivers what comes in: messages by sender, and peers going up and down."""

    async def dispatch(self, sender: str, message: Message) -> None: ...

    def on_membership(self, peer: PeerInfo | str, up: bool) -> None: ...


_POLL_S = 5.0  # upper bound of one wait in the link watchers; they loop, so it only bounds each wait
_PROBE_S = 2.0  # how long a TCP connect to one of a peer's candidate addresses may take before the next is tried
_MAX_REACHED_ON = 8
_MAX_REFUSED = 64

_remote: contextvars.ContextVar[str | None] = contextvars.ContextVar("exo_stable_peer_remote", default=None)
"""The remote address of the wire connection being accepted (set by :meth:`PeerManager.handle`)."""


class PeerUnreachable(ConnectionError):
    """No connected link leads to that node."""


@dataclass
class _Peer:
    info: PeerInfo | None = None
    out: PeerLink | None = None
    inbound: PeerLink | None = None
    up: bool = False
    remote_host: str | None = None
    """Where the peer's own connection to this node came from (an address it can be dialed on, likely)."""
    down_since: float | None = None  # monotonic time it went down (or was created without coming up)


class PeerManager:
    """Links to peers, routing, and membership events for one node."""

    def __init__(
        self,
        identity: Identity,
        *,
        secret: bytes | None = None,
        config: LinkConfig | None = None,
        forget_after_s: float = 60.0,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.config = config or LinkConfig.from_env()
        self.monitor = NetworkHealthMonitor()
        self._inbound: Inbound | None = None  # what run() delivers to
        self._secret = secret
        self.server = WireServer(identity, secret=secret, config=self.config, on_new_peer=self._accept)
        self._peers: dict[str, _Peer] = {}
        self._dialed: dict[str, PeerLink] = {}  # by URL
        self._dialed_address: dict[str, Address] = {}  # by URL
        self._probing: set[str] = set()  # node ids whose candidate addresses are being tried
        self.refused: dict[str, str] = {}
        """Peers whose links this node closed, with the reason (the most recent :data:`_MAX_REFUSED`)."""
        self.reached_on: list[str] = []
        """Local addresses peers reached this node on, most recent first (what a wildcard-bound node advertises)."""
        self._kept: set[str] = set()  # URLs dialed for good (static peers); the others may be forgotten
        self._dialed_at: dict[str, float] = {}
        self.forget_after_s = forget_after_s
        self.forgotten = 0
        self._links: list[PeerLink] = []
        self._tg: asyncio.TaskGroup | None = None
        self._ready = asyncio.Event()
        self._membership = asyncio.Event()
        self._stopping = False
        self.unroutable = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The wire route's handler (the node serves it on the same port as its API)."""
        sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
        if sockname:
            self._note_reached_on(unmap(str(sockname[0])))
        _remote.set(unmap(request.remote) if request.remote else None)
        return await self.server.handle(request)

    def _note_reached_on(self, host: str) -> None:
        if self.reached_on[:1] == [host]:
            return
        if host in self.reached_on:
            self.reached_on.remove(host)
        self.reached_on.insert(0, host)
        del self.reached_on[_MAX_REACHED_ON:]

    async def run(self, stop: asyncio.Event, inbound: Inbound) -> None:
        """Own every link task until ``stop`` is set, delivering what comes in to ``inbound``; then close all
        links (each with its deadline)."""
        self._inbound = inbound
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._ready.set()
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(_POLL_S, self.forget_after_s / 2)):
                            await stop.wait()
                    await self._sweep(time.monotonic())
                self._stopping = True  # no new links from now on
                # A probe or a handshake that was under way may still add a link while others close: close
                # until none is open, or the task group would wait on that link's pump forever.
                while still_open := [link for link in self._links if not link.closed]:
                    for link in still_open:
                        await link.close()
        finally:
            self._tg = None

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    def _spawn(self, link: PeerLink, label: str) -> None:
        assert self._tg is not None, "PeerManager.run() is not running"
        self._links.append(link)
        self._tg.create_task(self._pump(link), name=f"pump {label}")
        self._tg.create_task(self._watch(link), name=f"watch {label}")

    # -- links -----------------------------------------------------------------------------------------

    def dial(self, host: str, port: int, *, keep: bool = True) -> None:
        """Keep a link to the node at ``host:port``, reconnecting until the manager stops (``keep``) or until
        it has been unreachable for ``forget_after_s`` (an address learned from a peer or discovery)."""
        url = _url(host, port)
        if keep:
            self._kept.add(url)
        if url in self._dialed or self._stopping:
            return
        self._dialed_at[url] = time.monotonic()
        link = PeerLink(self.identity, url=url, secret=self._secret, config=self.config, monitor=self.monitor)
        self._dialed[url] = link
        self._dialed_address[url] = (host, port)
        self._spawn(link, url)
        assert self._tg is not None
        self._tg.create_task(link.start(), name=f"start {url}")

    def dial_any(self, node_id: str, candidates: Sequence[Address]) -> None:
        """Link to ``node_id``, dialing the first of ``candidates`` that accepts a TCP connection (the first of
        them when none does yet: that link keeps retrying). Nothing happens when a link to it exists or is
        being set up."""
        if self._stopping or not candidates or node_id == self.node_id or node_id in self._probing:
            return
        if self._is_up(node_id):
            return
        if any(_url(h, p) in self._dialed for h, p in candidates):
            return
        assert self._tg is not None, "PeerManager.run() is not running"
        self._probing.add(node_id)
        self._tg.create_task(self._probe_and_dial(node_id, list(candidates)), name=f"probe {node_id}")

    async def _probe_and_dial(self, node_id: str, candidates: list[Address]) -> None:
        try:
            for host, port in candidates:
                try:
                    async with asyncio.timeout(_PROBE_S):
                        _reader, writer = await asyncio.open_connection(host, port)
                except (OSError, TimeoutError) as exc:
                    shown = format_host_port(host, port)
                    log.info("%s: %s is not reachable at %s: %r", self.node_id, node_id, shown, exc)
                    continue
                writer.close()
                try:
                    async with asyncio.timeout(_PROBE_S):
                        await writer.wait_closed()
                except (OSError, TimeoutError) as exc:
                    log.debug("%s: closing the probe to %s: %r", self.node_id, node_id, exc)
                log.info("%s: dialing %s at %s", self.node_id, node_id, format_host_port(host, port))
                self.dial(host, port, keep=False)
                return
            log.warning("%s: none of %s's addresses answers yet; retrying the first", self.node_id, node_id)
            self.dial(*candidates[0], keep=False)
        finally:
            self._probing.discard(node_id)

    def _accept(self, hello: Hello) -> PeerLink | None:
        if hello.node_id == self.node_id or self._tg is None or self._stopping:
            return None
        link = PeerLink(
            self.identity, peer_id=hello.node_id, secret=self._secret, config=self.config, monitor=self.monitor
        )
        peer = self._peers.setdefault(hello.node_id, _Peer(down_since=time.monotonic()))
        peer.inbound = link
        peer.remote_host = _remote.get()
        self._spawn(link, f"from {hello.node_id}")
        return link

    async def _pump(self, link: PeerLink) -> None:
        """Deliver what the link receives, in order, to the node's dispatcher."""
        while not link.closed:
            try:
                message = await link.recv(timeout=_POLL_S)
            except TimeoutError:
                continue
            except LinkClosed:
                return
            sender = link.peer_id
            if sender is None:
                continue
            if sender != self.node_id and not self._is_up(sender) and link.connected and link.peer is not None:
                if link.peer.model_fingerprint != self.identity.model_fingerprint:
                    continue  # its watcher is about to refuse it: nothing it sent counts
                self._connected(link, link.peer)  # its watcher has not run yet: the sender is up before its message
            await self._deliver(sender, message)

    async def _watch(self, link: PeerLink) -> None:
        """Turn the link's connections into membership events."""
        while not link.closed:
            try:
                info = await link.wait_connected(timeout=_POLL_S)
            except TimeoutError:
                continue
            except LinkClosed:
                return
            if info.node_id == self.node_id:
                log.warning("%s: %s leads to this node itself; closing that link", self.node_id, link.url)
                await link.close()
                return
            if info.model_fingerprint != self.identity.model_fingerprint:
                # Both sides see the mismatch in their own handshake and both log it; the dialer's closed link
                # does not reconnect, so the refusal is said once per side, not in a loop.
                reason = (
                    f"it serves model {info.model_fingerprint or '(none)'}, this node serves"
                    f" {self.identity.model_fingerprint or '(none)'}: start every node with the same --model"
                )
                self._refuse(info.node_id, reason)
                await link.close()
                return
            self._connected(link, info)
            while link.connected:
                try:
                    await link.wait_disconnected(timeout=_POLL_S)
                except TimeoutError:
                    continue
            self._update(info.node_id)

    def _connected(self, link: PeerLink, info: PeerInfo) -> None:
        peer = self._peers.setdefault(info.node_id, _Peer())
        peer.info = info
        if link.url is not None:
            peer.out = link
        self._update(info.node_id)

    def _refuse(self, node_id: str, reason: str) -> None:
        log.warning("%s: refusing peer %s: %s", self.node_id, safe(node_id), safe(reason))
        self.refused.pop(node_id, None)
        self.refused[node_id] = reason
        while len(self.refused) > _MAX_REFUSED:
            del self.refused[next(iter(self.refused))]

    def _update(self, node_id: str) -> None:
        peer = self._peers[node_id]
        up = any(link is not None and link.connected for link in (peer.out, peer.inbound))
        peer.down_since = None if up else (peer.down_since or time.monotonic())
        if up != peer.up:
            peer.up = up
            assert peer.info is not None
            log.info("%s: peer %s is %s", self.node_id, node_id, "up" if up else "down")
            self._membership.set()
            assert self._inbound is not None, "PeerManager.run() is not running"
            self._inbound.on_membership(peer.info if up else node_id, up)

    async def _sweep(self, now: float) -> None:
        """Forget peers down for ``forget_after_s`` and dialed addresses that never answered for as long."""
        horizon = now - self.forget_after_s
        for node_id, peer in list(self._peers.items()):
            if peer.up or peer.down_since is None or peer.down_since > horizon:
                continue
            if peer.inbound is not None:
                await self._drop(peer.inbound)
                peer.inbound = None
            if peer.out is not None and peer.out.url not in self._kept:
                await self._drop(peer.out)
                peer.out = None
            if peer.out is None:
                del self._peers[node_id]
                self.monitor.forget(node_id)
                self.forgotten += 1
                log.info("%s: forgot %s (down for %.0fs)", self.node_id, safe(node_id), now - peer.down_since)
        for url, link in list(self._dialed.items()):
            if url not in self._kept and link.peer is None and self._dialed_at.get(url, now) <= horizon:
                await self._drop(link)
        self._links = [link for link in self._links if not link.closed]

    async def _drop(self, link: PeerLink) -> None:
        await link.close()
        if link.url is not None:
            self._dialed.pop(link.url, None)
            self._dialed_at.pop(link.url, None)
            self._dialed_address.pop(link.url, None)
        elif link.peer_id is not None and self.server.link(link.peer_id) is link:
            self.server.unregister(link.peer_id)

    # -- routing ---------------------------------------------------------------------------------------

    async def wait_connected_to(self, node_ids: set[str], timeout: float) -> None:  # noqa: ASYNC109
        """Wait until a link to each of ``node_ids`` (this node aside) is up."""
        async with asyncio.timeout(timeout):
            while missing := {n for n in node_ids if n != self.node_id and not self._is_up(n)}:
                log.debug("%s: waiting for links to %s", self.node_id, sorted(missing))
                self._membership.clear()
                await self._membership.wait()

    def _is_up(self, node_id: str) -> bool:
        peer = self._peers.get(node_id)
        return peer is not None and peer.up

    def dialed(self, host: str, port: int) -> bool:
        return _url(host, port) in self._dialed

    def reached_at(self, node_id: str) -> Address | None:
        """The address this node's own connected link to ``node_id`` dialed (proven to work), if any."""
        peer = self._peers.get(node_id)
        link = peer.out if peer else None
        if link is None or not link.connected or link.url is None:
            return None
        return self._dialed_address.get(link.url)

    def remote_host(self, node_id: str) -> str | None:
        """Where ``node_id``'s connection to this node came from, if it dialed this node."""
        peer = self._peers.get(node_id)
        return peer.remote_host if peer else None

    def connected_peers(self) -> dict[str, PeerInfo]:
        return {nid: p.info for nid, p in self._peers.items() if p.up and p.info is not None}

    async def send(self, node_id: str, message: Message, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Queue ``message`` for ``node_id`` (this node: dispatched in process)."""
        if node_id == self.node_id:
            await self._deliver(node_id, message)
            return
        peer = self._peers.get(node_id)
        for link in (peer.out, peer.inbound) if peer else ():
            if link is not None and link.connected and not link.closed:
                await link.send(message, timeout=timeout)
                return
        # A link that is reconnecting keeps what is queued and delivers it once back: prefer it over failing.
        for link in (peer.out, peer.inbound) if peer else ():
            if link is not None and not link.closed:
                await link.send(message, timeout=timeout)
                return
        self.unroutable += 1
        raise PeerUnreachable(f"no link from {self.node_id} to {node_id}")

    async def _deliver(self, sender: str, message: Message) -> None:
        assert self._inbound is not None, "PeerManager.run() is not running"
        await self._inbound.dispatch(sender, message)

    def statistics(self) -> PeersStatistics:
        """Per peer: membership, health and each of its links' counters; the connections refused."""
        peers = []
        for nid, p in self._peers.items():
            links = {d: link.statistics() for d, link in (("out", p.out), ("in", p.inbound)) if link is not None}
            peers.append(PeerStatistics(nid, up=p.up, health=self.monitor.state(nid).value, links=links))
        refused = dict(self.refused)
        return PeersStatistics(tuple(peers), handshakes_refused=dict(self.server.rejections), refused=refused)


def _url(host: str, port: int) -> str:
    return f"ws://{format_host_port(host, port)}{WIRE_PATH}"
