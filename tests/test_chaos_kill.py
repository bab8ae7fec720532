"""SIGKILL a stage's process mid-answer: the answer goes on (I2, I6), on real node processes.

Three nodes hold the default model's layers; a streamed request is owned by node 0. After a few tokens the
last stage's process is killed. The owner sees the node go, the survivors commit a new plan, the owner
replays the request on it, and the client's stream continues: its whole text equals the uninterrupted
single-device answer, with one finish reason and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster_proc import free_port_block
from sse import DONE, sse_events

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.pipeline.service import GenerationJob, GenerationResult, InferenceService
from exo_stable.tokenizer import ChatMessage

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]

MAX_TOKENS = 32
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[tuple[list[int], list[subprocess.Popen[bytes]]]]:
    base = free_port_block(3)
    ports = [base + i for i in range(3)]
    prefix = f"k{secrets.token_hex(3)}n"
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    secret = secrets.token_hex(8)
    procs = []
    for i, port in enumerate(ports):
        log = (tmp_path / f"node{i}.log").open("wb")
        cmd = [
            sys.executable,
            "-m",
            "exo_stable",
            "serve",
            "--port",
            str(port),
            "--node-id",
            f"{prefix}{i}",
            "--peers",
            peers,
            "--no-discovery",
            "--dtype",
            "float32",
            "--cluster-secret",
            secret,
        ]
        with log:  # the child has its own copy of the descriptor
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    try:
        yield ports, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for i, proc in enumerate(procs):
            if i != 2:  # the victim was SIGKILLed; the survivors must have stopped cleanly
                text = (tmp_path / f"node{i}.log").read_text(errors="replace")
                assert proc.returncode == 0, f"node {i} exited {proc.returncode}:\n{text[-3000:]}"
                assert "Traceback" not in text, text[-5000:]


async def cluster_plan(session: aiohttp.ClientSession, port: int) -> dict[str, Any] | None:
    try:
        async with session.get(f"http://127.0.0.1:{port}/v1/cluster") as resp:
            plan: dict[str, Any] | None = (await resp.json())["plan"]
            return plan
    except aiohttp.ClientError:
        return None


async def wait_stages(session: aiohttp.ClientSession, ports: list[int], n: int, timeout_s: float) -> dict[str, Any]:
    """Poll (these are other processes) until every port reports the same plan with ``n`` stages."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        plans = [await cluster_plan(session, p) for p in ports]
        if all(p is not None and len(p["stages"]) == n for p in plans) and len({p["epoch"] for p in plans}) == 1:
            assert plans[0] is not None
            return plans[0]
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no {n}-stage plan on ports {ports} within {timeout_s}s")


async def reference_text(default_gguf: Path) -> str:
    source = open_model(default_gguf)
    engine = SingleDeviceEngine(source, dtype=Dtype.FLOAT32)
    await engine.start()
    try:
        service = InferenceService(engine)
        prompt = source.tokenizer.encode_chat([ChatMessage(**m) for m in MESSAGES])
        result = GenerationResult(prompt_tokens=len(prompt))
        return "".join(
            [result.add(d).text async for d in service.stream(GenerationJob(prompt, SamplingParams(), MAX_TOKENS))]
        )
    finally:
        engine.close()


async def test_sigkill_of_the_last_stage_mid_stream(
    three_nodes: tuple[list[int], list[subprocess.Popen[bytes]]], default_gguf: Path
) -> None:
    ports, procs = three_nodes
    expected = await reference_text(default_gguf)
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=400)) as session:
        plan = await wait_stages(session, ports, 3, timeout_s=300)
        assert plan["stages"][-1]["node_id"].endswith("2")
        deltas: list[str] = []
        finishes: list[str] = []
        lines: list[str] = []
        killed_at = None
        async with session.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for event in sse_events(resp, lines):
                assert "error" not in event, event
                choice = event["choices"][0]
                if choice["delta"].get("content"):
                    deltas.append(choice["delta"]["content"])
                if choice["finish_reason"]:
                    finishes.append(choice["finish_reason"])
                if killed_at is None and len(deltas) >= 5:
                    killed_at = len(deltas)
                    os.kill(procs[2].pid, signal.SIGKILL)
        assert killed_at is not None
        assert lines[-1] == DONE
        assert len(finishes) == 1
        assert "".join(deltas) == expected, "the answer after the kill continues exactly where it was"
        after = await wait_stages(session, ports[:2], 2, timeout_s=60)
        assert all(not s["node_id"].endswith("2") for s in after["stages"])
        async with session.get(f"http://127.0.0.1:{ports[0]}/health") as resp:
            health = await resp.json()
        assert health["owner"]["recoveries"] >= 1
