"""PeerLinkActor: two links inside an ActorSystem exchange messages through actors."""

from __future__ import annotations

import asyncio
from typing import Any

from actors import Actor, ActorSystem
from exo_stable.wire.faults import FaultConfig
from exo_stable.wire.handshake import Identity, new_session_id
from exo_stable.wire.messages import Note
from exo_stable.wire.peerlink import LinkConfig, LinkStats, PeerLink
from exo_stable.wire.peerlink_actor import Delivered, Flush, GetStats, PeerLinkActor, Send
from exo_stable.wire.server import WireServer

N = 500


class Collector(Actor[Delivered]):
    def __init__(self, n: int) -> None:
        self.got: list[Note] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.n = n

    async def receive(self, message: Delivered) -> Any:
        assert message.peer == "a" and isinstance(message.message, Note)
        self.got.append(message.message)
        if len(self.got) == self.n and not self.done.done():
            self.done.set_result(None)


async def test_peerlink_actors_deliver_in_order_under_faults() -> None:
    config = LinkConfig(heartbeat_interval_s=0.25, faults=FaultConfig(drop=0.02, dup=0.02, reorder=3, seed=11))
    b_id, a_id = Identity("b", new_session_id()), Identity("a", new_session_id())
    async with WireServer(b_id, config=config) as server, ActorSystem("wire-test") as system:
        collector = Collector(N)
        sink = await system.spawn(collector, name="collector")
        b_link = PeerLink(b_id, peer_id="a", config=config)
        server.register(b_link)
        await system.spawn(PeerLinkActor(b_link, deliver_to=sink), name="link-b")
        a = await system.spawn(PeerLinkActor(PeerLink(a_id, url=server.url, peer_id="b", config=config)))
        for i in range(N):
            await a.ask(Send(Note(n=i, text=str(i))), timeout=10)
        await a.ask(Flush(timeout=10), timeout=15)
        async with asyncio.timeout(10):
            await collector.done
        assert [m.n for m in collector.got] == list(range(N))
        assert all(m.text == str(m.n) for m in collector.got)
        stats = await a.ask(GetStats(), timeout=5)
        assert isinstance(stats, LinkStats) and stats.messages_acked == N
