"""Reading a streamed (server-sent events) OpenAI-style response in tests."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

DONE = "data: [DONE]"


async def sse_events(resp: aiohttp.ClientResponse, lines: list[str] | None = None) -> AsyncGenerator[dict[str, Any]]:
    """The JSON events of ``resp``'s body up to ``data: [DONE]``; each non-empty line read is appended to
    ``lines`` (so a caller can check how the body ended)."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line:
            continue
        if lines is not None:
            lines.append(line)
        if line == DONE:
            return
        event: dict[str, Any] = json.loads(line.removeprefix("data: "))
        yield event
