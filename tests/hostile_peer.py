"""A hostile peer for tests: a real link to a node that sends whatever the test wants, and helpers around it.

Opts out of assert rewriting (PYTEST_DONT_REWRITE): test modules import it; its asserts carry messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp

from exo_stable.wire.handshake import Identity, new_session_id
from exo_stable.wire.messages import Message
from exo_stable.wire.peerlink import WIRE_PATH, LinkConfig, PeerLink


def identity(node_id: str, fingerprint: str, *, memory_bytes: int = 1 << 30) -> Identity:
    return Identity(
        node_id, new_session_id(), capabilities=("mlx",), memory_bytes=memory_bytes, model_fingerprint=fingerprint
    )


@asynccontextmanager
async def hostile_link(
    port: int, me: Identity, *, secret: bytes | None = None, config: LinkConfig | None = None
) -> AsyncIterator[PeerLink]:
    """A connected link from ``me`` to the node on ``port``; what the node sends is read and dropped."""
    link = PeerLink(me, url=f"ws://127.0.0.1:{port}{WIRE_PATH}", secret=secret, config=config)
    async with link:
        await link.wait_connected(timeout=15.0)

        async def drain() -> None:
            while not link.closed:
                try:
                    await link.recv(timeout=1.0)
                except TimeoutError:
                    continue

        task = asyncio.create_task(drain())
        try:
            yield link
        finally:
            task.cancel()


async def send_all(link: PeerLink, messages: list[Message]) -> None:
    for message in messages:
        await link.send(message, timeout=10.0)
    await link.wait_acked(timeout=15.0)


async def eventually(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` (another process's or task's state: nothing to wait on) until true or the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def complete(http: aiohttp.ClientSession, root: str, prompt: list[int], n: int = 8) -> str:
    """A greedy completion's text (asserting a 200)."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
    async with http.post(f"{root}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
    text: str = payload["choices"][0]["text"]
    return text
