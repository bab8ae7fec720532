"""Clusters of in-process nodes over real sockets on 127.0.0.1, for tests that reach into the nodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.node.node import Node, NodeConfig


@asynccontextmanager
async def in_process_cluster(
    model: Path,
    n: int,
    prefix: str,
    *,
    split: tuple[int, ...] | None = None,
    memory_bytes: int | None = None,
    timeout: float = 240.0,  # noqa: ASYNC109 (the whole cluster's life, start to stop)
    **options: Any,  # more NodeConfig fields, the same for every node
) -> AsyncIterator[tuple[list[Node], list[asyncio.Event]]]:
    """``n`` nodes ``{prefix}-0``... dialled to the first, yielded once every node runs an ``n``-stage plan,
    with one stop event per node (set one to make that node leave); all stop when the block ends."""
    nodes = []
    for i in range(n):
        config = NodeConfig(
            model=model,
            dtype=Dtype.FLOAT32,
            port=0,
            node_id=f"{prefix}-{i}",
            split=split,
            memory_bytes=memory_bytes,
            **options,
        )
        nodes.append(Node(config, open_model(model)))
    stops = [asyncio.Event() for _ in nodes]
    async with asyncio.timeout(timeout), asyncio.TaskGroup() as tg:
        for node, stop in zip(nodes, stops, strict=True):
            tg.create_task(node.run(stop=stop, handle_signals=False))
        try:
            first = await nodes[0].wait_listening(timeout=60)
            for node in nodes[1:]:
                await node.wait_listening(timeout=60)
                node.peers.dial("127.0.0.1", first)
            for node in nodes:
                await node.coordinator.wait_plan_where(lambda p: len(p.stages) == n, timeout=60)
            yield nodes, stops
        finally:
            for stop in stops:
                stop.set()
