"""Strangers leave nothing behind: refused hellos create no state; peers that came and went are forgotten.

One in-process node (real sockets) with a short forget bound; raw websockets and real PeerLinks as peers.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hostile_peer import eventually, hostile_link, identity

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.node.node import Node, NodeConfig
from exo_stable.wire.frame import FrameCodec
from exo_stable.wire.handshake import new_nonce
from exo_stable.wire.messages import PROTOCOL_VERSION, Hello
from exo_stable.wire.peerlink import WIRE_PATH, send_handshake


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("state") / "tiny.gguf", default_gguf, layers=2, seed=6)


@pytest.fixture
async def node(tiny_model: Path) -> AsyncIterator[Node]:
    config = NodeConfig(
        model=tiny_model, dtype=Dtype.FLOAT32, port=0, node_id=f"s{secrets.token_hex(3)}", peer_forget_s=1.0
    )
    n = Node(config, open_model(tiny_model))
    stop = asyncio.Event()
    task = asyncio.create_task(n.run(stop=stop, handle_signals=False))
    try:
        await n.wait_listening(timeout=60)
        await n.coordinator.wait_plan(timeout=60)
        yield n
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task


async def scrape(http: aiohttp.ClientSession, node: Node) -> tuple[str, str]:
    root = f"http://127.0.0.1:{node.port}"
    async with http.get(f"{root}/health") as health, http.get(f"{root}/metrics") as metrics:
        return await health.text(), await metrics.text()


async def test_peers_that_came_and_went_and_refused_hellos_leave_nothing(node: Node) -> None:
    async with aiohttp.ClientSession() as http:
        health_before, metrics_before = await scrape(http, node)
        # 40 peers holding another model: linked (no secret here), never members, then gone.
        for i in range(40):
            async with hostile_link(node.port, identity(f"other-{i}", "f" * 32)):
                pass
        assert node.coordinator.members.keys() == {node.node_id}
        _, metrics = await scrape(http, node)
        assert "other-" not in metrics, "a non-member got metric labels"
        await eventually("the departed peers forgotten", lambda: not node.peers._peers, timeout=20)
        assert not node.coordinator.refused and not node.peers.server._links
        # 300 hellos in a protocol this node does not speak: refused, nothing kept (and soon rate-limited).
        codec = FrameCodec(max_frame_bytes=1 << 20)
        url = f"ws://127.0.0.1:{node.port}{WIRE_PATH}"

        async def refused_hello(i: int) -> None:
            async with http.ws_connect(url) as ws:
                hello = Hello(
                    node_id=f"old-{i}\nCRITICAL forged",
                    protocol_version=PROTOCOL_VERSION + 7,
                    session_id="s",
                    nonce=new_nonce(),
                )
                await send_handshake(ws, codec, hello)
                await ws.receive(timeout=10)

        for batch in range(10):
            await asyncio.gather(*(refused_hello(batch * 30 + i) for i in range(30)))
        assert not node.peers._peers and not node.peers.server._links and not node.peers._links
        health, metrics = await scrape(http, node)
        assert "old-" not in health + metrics
        assert len(health) < len(health_before) + 2000, "/health grew with strangers"
        assert len(metrics) < len(metrics_before) + 4000, "/metrics grew with strangers"
        assert sum(node.peers.server.rejections.values()) >= 300
        assert len(node.peers.server.rejections) <= 3
