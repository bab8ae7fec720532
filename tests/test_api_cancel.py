"""A client that goes away mid-stream cancels its generation; concurrent streams match their sequential runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from server_proc import ServerProcess, Streamed, stream_request

pytest_plugins = ("server_proc",)

CHAT = "/v1/chat/completions"
POLL_DEADLINE_S = 60.0
POLL_INTERVAL_S = 0.1


@pytest.fixture
async def http(api_server: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(api_server.root, timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def health(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get("/health") as resp:
        assert resp.status == 200
        out: dict[str, Any] = await resp.json()
    return out


async def wait_idle(http: aiohttp.ClientSession) -> dict[str, Any]:
    """Poll the server (another process) until no request is active, within a deadline."""
    deadline = time.monotonic() + POLL_DEADLINE_S
    while (now := await health(http))["active_requests"] != 0:
        assert time.monotonic() < deadline, f"requests still active after {POLL_DEADLINE_S:.0f}s: {now}"
        await asyncio.sleep(POLL_INTERVAL_S)
    return now


async def test_disconnect_mid_stream_cancels_the_generation(
    http: aiohttp.ClientSession, api_server: ServerProcess
) -> None:
    before = await wait_idle(http)
    body = {
        "messages": [{"role": "user", "content": "Write a very long essay about the history of Europe."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    # A connection of its own, so that closing it is what the server sees.
    async with aiohttp.ClientSession(api_server.root, timeout=aiohttp.ClientTimeout(total=120)) as own:
        resp = await own.post(CHAT, json=body)
        assert resp.status == 200
        events = 0
        async for line in resp.content:
            if line.startswith(b"data: "):
                assert b"[DONE]" not in line
                events += 1
                if events == 3:
                    break
        assert (await health(http))["active_requests"] == 1
        resp.close()  # drop the connection mid-stream

    after = await wait_idle(http)
    assert after["requests_started"] == before["requests_started"] + 1
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert generated < 200, f"{generated} tokens generated for a client that left after 2"
    # Nothing is generating any more: a fresh request completes, and only its own tokens are counted.
    quick = await stream_request(
        http, CHAT, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    )
    assert quick.finish_reason in ("stop", "length")
    final = await wait_idle(http)
    assert final["generated_tokens"] - after["generated_tokens"] <= 2


async def test_disconnect_while_waiting_for_an_unstreamed_reply_cancels_it(
    http: aiohttp.ClientSession, api_server: ServerProcess
) -> None:
    before = await wait_idle(http)
    body = {"messages": [{"role": "user", "content": "Write a very long essay."}], "max_tokens": 2000}
    with pytest.raises(TimeoutError):
        async with (
            aiohttp.ClientSession(api_server.root, timeout=aiohttp.ClientTimeout(total=1.5)) as own,
            own.post(CHAT, json=body) as resp,
        ):
            await resp.read()
    after = await wait_idle(http)
    assert after["requests_started"] == before["requests_started"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 200


PROMPTS = ["What is the capital of France?", "What is 12 + 30?", "Name three primary colors."]


async def test_concurrent_streams_equal_their_sequential_runs(http: aiohttp.ClientSession) -> None:
    bodies = [{"messages": [{"role": "user", "content": p}], "max_tokens": 10, "temperature": 0} for p in PROMPTS]
    sequential = [await stream_request(http, CHAT, b) for b in bodies]
    assert len({s.text for s in sequential}) == len(PROMPTS), "distinct prompts gave the same reply"

    concurrent: list[Streamed] = await asyncio.gather(*(stream_request(http, CHAT, b) for b in bodies))
    for one, alone in zip(concurrent, sequential, strict=True):
        assert one.text == alone.text
        assert one.finish_reason == alone.finish_reason
    assert len({c.chunks[0]["id"] for c in concurrent}) == len(PROMPTS), "concurrent requests share an id"
    assert (await wait_idle(http))["active_requests"] == 0


async def test_concurrent_streams_interleave(http: aiohttp.ClientSession) -> None:
    """While one long stream runs, a short one started after it finishes first: requests do not queue."""
    long_body = {
        "messages": [{"role": "user", "content": "Write a very long essay about the history of Europe."}],
        "max_tokens": 2000,
        "temperature": 0,
    }
    short_body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 2, "temperature": 0}
    order: list[str] = []

    async def run(name: str, body: dict[str, Any], started: asyncio.Event | None) -> None:
        async with http.post(CHAT, json={**body, "stream": True}) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if started is not None and line.startswith(b"data: {"):
                    started.set()
                if line.strip() == b"data: [DONE]":
                    order.append(name)
                elif line.startswith(b"data: "):
                    assert "error" not in json.loads(line[6:])

    long_chunk = asyncio.Event()
    long_task = asyncio.create_task(run("long", long_body, long_chunk))
    try:
        async with asyncio.timeout(60):
            await long_chunk.wait()
            await run("short", short_body, None)
        # The long reply (up to 2000 tokens) is still streaming when the short one has ended, and goes on.
        assert order == ["short"]
        long_chunk.clear()
        async with asyncio.timeout(60):
            await long_chunk.wait()
        assert order == ["short"], "the long stream stopped when the short one ended"
    finally:
        long_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await long_task
    assert (await wait_idle(http))["active_requests"] == 0
