"""SIGKILL a stage's process while it batches several requests: every one of them finishes exactly (I2, I6).

Three real node processes hold the default model's layers. Four streamed requests (two greedy, two seeded)
run at once, owned by node 0, so the stages run their decode steps in shared forward calls. Once every
stream has a few tokens and the last stage has computed rows of several requests together, its process is
killed. The owner replays each request on the survivors' new plan; every client's whole text must equal
that request's uninterrupted answer on a single device, with one finish reason and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sse import DONE, sse_events
from test_chaos_kill import three_nodes, wait_stages  # noqa: F401 (three_nodes: the fixture, used by name)

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.pipeline.service import GenerationJob, GenerationResult, InferenceService
from exo_stable.tokenizer import ChatMessage

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]

MAX_TOKENS = 40
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("Write a haiku about the sea.", {"temperature": 0}),
    ("Name three colours.", {"temperature": 0}),
    ("Write a haiku about the sea.", {"temperature": 0.8, "top_p": 0.9, "seed": 7}),
    ("Tell me a fact about owls.", {"temperature": 0.7, "top_k": 40, "seed": 3}),
]
KILL_AFTER = 4  # deltas every stream must have before the kill


async def references(default_gguf: Path) -> list[str]:
    """Each request alone, uninterrupted, on a single device."""
    source = open_model(default_gguf)
    engine = SingleDeviceEngine(source, dtype=Dtype.FLOAT32)
    await engine.start()
    try:
        service = InferenceService(engine)
        out = []
        for text, sampling in REQUESTS:
            prompt = source.tokenizer.encode_chat([ChatMessage(role="user", content=text)])
            result = GenerationResult(prompt_tokens=len(prompt))
            job = GenerationJob(prompt, SamplingParams(**sampling), MAX_TOKENS)
            out.append("".join([result.add(d).text async for d in service.stream(job)]))
        return out
    finally:
        engine.close()


async def test_sigkill_of_a_batching_stage_replays_every_request_of_its_batch(
    three_nodes: tuple[list[int], list[subprocess.Popen[bytes]]],  # noqa: F811
    default_gguf: Path,
) -> None:
    ports, procs = three_nodes
    expected = await references(default_gguf)
    deltas: list[list[str]] = [[] for _ in REQUESTS]
    ready = asyncio.Event()  # every stream has KILL_AFTER deltas
    killed = asyncio.Event()

    async def stream(session: aiohttp.ClientSession, k: int) -> tuple[list[str], list[str]]:
        text, sampling = REQUESTS[k]
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "stream": True, **sampling}
        lines: list[str] = []
        finishes: list[str] = []
        async with session.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for event in sse_events(resp, lines):
                assert "error" not in event, event
                choice = event["choices"][0]
                if choice["delta"].get("content"):
                    deltas[k].append(choice["delta"]["content"])
                if choice["finish_reason"]:
                    finishes.append(choice["finish_reason"])
                if all(len(d) >= KILL_AFTER for d in deltas):
                    ready.set()
                if not killed.is_set():
                    assert choice["finish_reason"] is None, "a request ended before the kill: make it longer"
        return lines, finishes

    async def kill_when_batched(session: aiohttp.ClientSession) -> int:
        await ready.wait()
        # Kill once the last stage has shared a forward call between requests (whether it has by the time every
        # stream has KILL_AFTER deltas depends on how the steps happened to meet), within a deadline.
        async with asyncio.timeout(120):
            while True:
                async with session.get(f"http://127.0.0.1:{ports[2]}/health") as resp:
                    stage = (await resp.json())["stage"]
                if stage["batching"]["batched_rows"] > 0:
                    break
                await asyncio.sleep(0.05)  # polling /health, not synchronising: the streams run on meanwhile
        os.kill(procs[2].pid, signal.SIGKILL)
        killed.set()
        return int(stage["batching"]["batched_rows"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=500)) as session:
        plan = await wait_stages(session, ports, 3, timeout_s=300)
        assert plan["stages"][-1]["node_id"].endswith("2")
        async with asyncio.timeout(480):
            killer = asyncio.create_task(kill_when_batched(session))
            outcomes = await asyncio.gather(*(stream(session, k) for k in range(len(REQUESTS))))
            batched_rows = await killer
        assert batched_rows > 0, "the killed stage never ran several requests' steps in one forward call"
        for k, (lines, finishes) in enumerate(outcomes):
            assert lines[-1] == DONE and len(finishes) == 1
            assert "".join(deltas[k]) == expected[k], f"request {k} continues exactly where it was"
        after = await wait_stages(session, ports[:2], 2, timeout_s=60)
        assert all(not s["node_id"].endswith("2") for s in after["stages"])
        async with session.get(f"http://127.0.0.1:{ports[0]}/health") as resp:
            health = await resp.json()
        assert health["owner"]["recoveries"] >= len(REQUESTS)
