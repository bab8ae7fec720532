"""Gossip: the addresses this node tells its peers to dial, and the peer directory it sends whenever someone
joins (so that members form a full mesh) and acts on when a peer sends one."""

from __future__ import annotations

import asyncio
import logging

from exo_stable.cluster import addresses as addr
from exo_stable.cluster.exposure import peer_addresses
from exo_stable.cluster.peers import PeerManager
from exo_stable.wire.handshake import PeerInfo
from exo_stable.wire.messages import PeerAddress, PeerDirectory

log = logging.getLogger(__name__)


class Gossip:
    """This node's addresses and the peer directory: sent on every join, acted on when received."""

    def __init__(
        self,
        node_id: str,
        *,
        peers: PeerManager,
        host: str,
        port: int,
        advertise: tuple[str, int | None] | None,
        interface_ips: list[str],
    ) -> None:
        self.node_id = node_id
        self.peers = peers
        self.host = host
        self.port = port
        self.advertise = None if advertise is None else (advertise[0], port if advertise[1] is None else advertise[1])
        self.interface_ips = interface_ips
        self._changed = asyncio.Event()

    def addresses(self) -> list[addr.Address]:
        """Where peers should dial this node, best first: never a wildcard (see cluster/addresses.py)."""
        return addr.advertised_addresses(
            self.host,
            self.port,
            advertise=self.advertise,
            reached_on=self.peers.reached_on,
            interface_ips=self.interface_ips,
        )

    def peer_addresses(self, node_id: str, info: PeerInfo) -> list[addr.Address]:
        return peer_addresses(self.peers, node_id, info)

    def directory(self) -> PeerDirectory:
        """This node and every peer it knows, with the addresses each one can be dialed on."""
        entries = [PeerAddress(self.node_id, h, p) for h, p in self.addresses()]
        for node_id, info in self.peers.connected_peers().items():
            entries += [PeerAddress(node_id, h, p) for h, p in self.peer_addresses(node_id, info)]
        return PeerDirectory(peers=tuple(entries))

    def joined(self) -> None:
        """A peer came up: everyone should hear of it."""
        self._changed.set()

    def learn(self, directory: PeerDirectory) -> None:
        """Dial every node of a peer's directory this node has no link to (the first address that answers)."""
        candidates: dict[str, list[addr.Address]] = {}
        for entry in directory.peers:
            candidates.setdefault(entry.node_id, []).append((entry.host, entry.port))
        connected = self.peers.connected_peers()
        for node_id, found in candidates.items():
            if node_id != self.node_id and node_id not in connected:
                self.peers.dial_any(node_id, addr.dial_candidates(found))

    async def run(self, stop: asyncio.Event) -> None:
        """Tell every peer about every other one whenever someone joins, until ``stop``."""
        while not stop.is_set():
            try:
                async with asyncio.timeout(5.0):
                    await self._changed.wait()
            except TimeoutError:
                continue
            self._changed.clear()
            if stop.is_set():
                return
            directory = self.directory()
            for node_id in list(self.peers.connected_peers()):
                try:
                    await self.peers.send(node_id, directory, timeout=5.0)
                except (ConnectionError, TimeoutError) as exc:
                    log.info("%s: could not send the peer directory to %s: %r", self.node_id, node_id, exc)

    def wake(self) -> None:
        """Wake the loop (at shutdown, so that it notices the stop at once)."""
        self._changed.set()
