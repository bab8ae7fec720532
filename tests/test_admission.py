"""Bounded admission (429 with Retry-After beyond --max-queue) and readiness (/health 503 until a plan)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cluster_proc import free_port_block

from exo_stable.api.server import ApiConfig, create_app
from exo_stable.engine.loader import open_model
from exo_stable.engine.textstream import Delta
from exo_stable.pipeline.service import GenerationJob, Service, ServiceBusy, ServiceOverloaded
from exo_stable.pipeline.trace import RequestTrace

pytestmark = pytest.mark.asyncio


class HeldService(Service):
    """Each request produces one delta once ``release`` is set: slots stay taken as long as a test wants."""

    def __init__(self, *, max_active: int, max_queue: int, admission_timeout_s: float = 30.0) -> None:
        source = open_model("random:tiny")
        super().__init__(
            source.tokenizer,
            model_name="held",
            context_length=256,
            dtype="float32",
            max_active=max_active,
            max_queue=max_queue,
            admission_timeout_s=admission_timeout_s,
        )
        self.release_all = asyncio.Event()
        self.changed = asyncio.Event()
        self.started = 0

    async def admit(self) -> None:
        # Runs once this request waits for a slot (or has one): the test sees the queue change.
        asyncio.get_running_loop().call_soon(self.changed.set)
        await super().admit()

    async def wait_for(self, started: int, queued: int) -> None:
        async with asyncio.timeout(10):
            while self.started < started or self.queued < queued:
                self.changed.clear()
                await self.changed.wait()

    async def stream(self, job: GenerationJob, trace: RequestTrace | None = None) -> AsyncGenerator[Delta]:
        self.started += 1
        self.changed.set()
        async with asyncio.timeout(30):
            await self.release_all.wait()
        yield Delta("x", "length", token_ids=(0,), completion_tokens=1)


async def test_admission_queue_is_bounded() -> None:
    service = HeldService(max_active=1, max_queue=1)
    await service.admit()
    waiting = asyncio.create_task(service.admit())
    await service.wait_for(0, 1)
    with pytest.raises(ServiceOverloaded) as refused:
        await service.admit()
    assert refused.value.retry_after_s >= 1
    assert service.refused_overloaded == 1
    service.release()
    await asyncio.wait_for(waiting, 5)
    assert (service.active, service.queued) == (1, 0)
    service.release()


async def test_the_admission_deadline_still_answers_busy() -> None:
    service = HeldService(max_active=1, max_queue=4, admission_timeout_s=0.2)
    await service.admit()
    with pytest.raises(ServiceBusy):
        await service.admit()
    assert service.queued == 0
    service.release()


async def test_http_429_with_retry_after_in_the_openai_shape() -> None:
    service = HeldService(max_active=1, max_queue=1)
    body: dict[str, Any] = {"model": "held", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with TestClient(TestServer(create_app(service, ApiConfig()))) as client:
        running = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        queued = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        await service.wait_for(1, 1)
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        error = (await resp.json())["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
        assert "queue" in error["message"]
        service.release_all.set()
        for task in (running, queued):
            done = await task
            assert done.status == 200, await done.text()
        live = await client.get("/health/live")
        assert live.status == 200
        metrics = await (await client.get("/metrics")).text()
        assert "exo_stable_overloaded_requests_total 1.0" in metrics, metrics


async def test_health_is_503_with_a_reason_until_a_plan_and_liveness_stays_200() -> None:
    """A node told to split across two stages, alone, can never plan: not ready, but alive."""
    port = free_port_block(1)
    cmd = [sys.executable, "-m", "exo_stable", "serve", "--port", str(port), "--model", "random:tiny"]
    cmd += ["--dtype", "float32", "--no-discovery", "--split", "2,2", "--node-id", f"ready{port}"]
    quiet = asyncio.subprocess.DEVNULL
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=quiet, stdout=quiet, stderr=quiet)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get("/health/live") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline and proc.returncode is None, "the node never listened"
                    await asyncio.sleep(0.2)  # polling another process until it listens
            async with http.get("/health") as resp:
                assert resp.status == 503
                health = await resp.json()
            assert health["status"] == "unavailable"
            assert "no pipeline plan" in health["reason"]
    finally:
        proc.terminate()
        async with asyncio.timeout(30):
            await proc.wait()
