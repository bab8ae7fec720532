"""One in-process node on its own event-loop thread, for hypothesis fuzz tests (which are synchronous).

Examples run coroutines on the node's loop with :meth:`BackgroundNode.call` (each with a deadline).
Opts out of assert rewriting (PYTEST_DONT_REWRITE): test modules import it; its asserts carry messages.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from exo_stable.api.server import ApiConfig
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.node.node import Node, NodeConfig

T = TypeVar("T")

FUZZ_EXAMPLES = int(os.environ.get("EXO_STABLE_FUZZ_EXAMPLES", "0")) or None
"""Overrides every fuzz test's example count (e.g. a longer local run); CI uses each test's own bound."""


class BackgroundNode:
    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop) -> None:
        self.node = node
        self.loop = loop

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.node.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def background_node(model: Path, *, secret: bytes | None = None, **config: Any) -> Iterator[BackgroundNode]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []
    node = Node(
        NodeConfig(
            model=model,
            dtype=Dtype.FLOAT32,
            port=0,
            node_id=f"fz{secrets.token_hex(3)}",
            cluster_secret=secret,
            api=ApiConfig(max_tokens_cap=16),
            **config,
        ),
        open_model(model),
    )

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop=stop, handle_signals=False))
        try:
            await node.wait_listening(timeout=60)
            await node.coordinator.wait_plan(timeout=60)
        finally:
            ready.set()
        await task

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported by the fixture's caller
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name="fuzz node", daemon=True)
    thread.start()
    assert ready.wait(120), "the fuzz node did not start"
    assert not failure, f"the fuzz node failed to start: {failure!r}"
    try:
        yield BackgroundNode(node, loop)
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()
        assert not failure, f"the fuzz node crashed: {failure!r}"
