"""What ``exo-stable verify`` runs prompts on: the single-device reference and the clusters it compares with it.

:class:`SingleDevice` is the whole model on one in-process engine (results cached); :func:`in_process_cluster`
starts N nodes over real sockets on 127.0.0.1 and yields an :class:`InProcessCluster` that can re-split;
:class:`RemoteCluster` reaches an existing cluster over its OpenAI API (text only: the API gives no ids).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from exo_stable.engine.loader import ModelSource, open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.node.node import Node, NodeConfig
from exo_stable.pipeline.service import GenerationJob, GenerationResult, InferenceService, ServiceUnavailable
from exo_stable.tokenizer import Tokenizer
from exo_stable.verify.results import Generation, Prompt, Unit, split_label

# --- targets ---------------------------------------------------------------------------------------


class ClusterTarget(Protocol):
    """Something that runs a prompt on a cluster."""

    @property
    def unit(self) -> Unit: ...

    def describe(self) -> str: ...

    async def generate(
        self, prompt: Prompt, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int
    ) -> Generation: ...


class SingleDevice:
    """The reference: the whole model on one in-process engine, results cached per (prompt, sampling)."""

    def __init__(self, source: ModelSource, dtype: Dtype, *, request_timeout_s: float = 300.0) -> None:
        self.source = source
        self.engine = SingleDeviceEngine(source, dtype=dtype)
        self.service = InferenceService(self.engine, max_active=16, admission_timeout_s=request_timeout_s)
        self.request_timeout_s = request_timeout_s
        self._cache: dict[tuple[Prompt, SamplingParams, int], Generation] = {}
        self._locks: dict[tuple[Prompt, SamplingParams, int], asyncio.Lock] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        return self.source.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode_chat(list(prompt.messages))

    async def __aenter__(self) -> SingleDevice:
        await self.engine.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.engine.close()

    async def generate(self, prompt: Prompt, params: SamplingParams, max_tokens: int) -> Generation:
        key = (prompt, params, max_tokens)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._cache:
                self._cache[key] = await self._run(self.encode(prompt), params, max_tokens)
            return self._cache[key]

    async def _run(self, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int) -> Generation:
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        text = ""
        started = time.perf_counter()
        async with asyncio.timeout(self.request_timeout_s):
            await self.service.admit()
            try:
                job = GenerationJob(prompt_ids, params, max_tokens)
                async with aclosing(self.service.stream(job)) as deltas:
                    async for delta in deltas:
                        text += result.add(delta).text
            finally:
                self.service.release()
        seconds = time.perf_counter() - started
        return Generation(tuple(result.token_ids), text, len(result.token_ids), seconds, result.finish_reason)


class InProcessCluster:
    """N nodes of this process over real sockets on 127.0.0.1; made by :func:`in_process_cluster`."""

    unit: Unit = "ids"

    def __init__(self, nodes: list[Node], *, request_timeout_s: float, plan_timeout_s: float) -> None:
        self.nodes = nodes
        self.request_timeout_s = request_timeout_s
        self.plan_timeout_s = plan_timeout_s
        self._owners = itertools.count()

    @property
    def split(self) -> tuple[int, ...]:
        plan = self.nodes[0].coordinator.active
        return () if plan is None else tuple(s.end - s.start for s in plan.stages)

    def describe(self) -> str:
        return split_label(self.split)

    async def resplit(self, split: tuple[int, ...]) -> None:
        """Commit a plan with these layers per stage and wait until every node runs it."""
        leader = min(self.nodes, key=lambda nd: nd.node_id)
        leader.coordinator.force_split(split)
        async with asyncio.timeout(self.plan_timeout_s):
            for node in self.nodes:
                await node.coordinator.wait_plan_where(
                    lambda p: tuple(s.end - s.start for s in p.stages) == split, timeout=self.plan_timeout_s
                )

    async def generate(
        self, prompt: Prompt, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int
    ) -> Generation:
        node = self.nodes[next(self._owners) % len(self.nodes)]  # any node can own a request
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        text = ""
        started = time.perf_counter()
        async with asyncio.timeout(self.request_timeout_s):
            job = GenerationJob(prompt_ids, params, max_tokens)
            async with aclosing(node.owner.stream(job)) as deltas:
                async for delta in deltas:
                    text += result.add(delta).text
        seconds = time.perf_counter() - started
        return Generation(tuple(result.token_ids), text, len(result.token_ids), seconds, result.finish_reason)


@asynccontextmanager
async def in_process_cluster(
    model: Path,
    dtype: Dtype,
    split: tuple[int, ...],
    *,
    max_concurrent: int = 8,
    start_timeout_s: float = 120.0,
    stop_timeout_s: float = 60.0,
    request_timeout_s: float = 300.0,
    name: str = "verify",
) -> AsyncIterator[InProcessCluster]:
    """Start ``len(split)`` nodes with ``split`` layers per stage; stop them all on exit (with a deadline)."""
    n = len(split)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            try:
                nodes: list[Node] = []
                for i in range(n):
                    config = NodeConfig(
                        model=model,
                        dtype=dtype,
                        port=0,
                        node_id=f"{name}{n}-{i}",
                        split=split,
                        max_concurrent=max_concurrent,
                        shutdown_timeout_s=5.0,
                    )
                    node = Node(config, open_model(model))
                    nodes.append(node)
                    tasks.append(tg.create_task(node.run(stop=stop, handle_signals=False), name=config.node_id))
                async with asyncio.timeout(start_timeout_s):
                    first = await nodes[0].wait_listening(timeout=start_timeout_s)
                    for node in nodes[1:]:
                        await node.wait_listening(timeout=start_timeout_s)
                        node.peers.dial("127.0.0.1", first)
                    for node in nodes:
                        await node.coordinator.wait_plan_where(
                            lambda p: tuple(s.end - s.start for s in p.stages) == split, timeout=start_timeout_s
                        )
                yield InProcessCluster(nodes, request_timeout_s=request_timeout_s, plan_timeout_s=start_timeout_s)
            finally:
                stop.set()
                if tasks:
                    _, pending = await asyncio.wait(tasks, timeout=stop_timeout_s)
                    for task in pending:
                        task.cancel()
    except BaseExceptionGroup as group:
        # The TaskGroup wraps whatever ended the block; one failure is reported as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class RemoteCluster:
    """An existing cluster reached through the OpenAI API of its nodes (requests go round-robin)."""

    unit: Unit = "text"

    def __init__(self, urls: Sequence[str], *, api_key: str | None = None, request_timeout_s: float = 300.0) -> None:
        if not urls:
            raise ValueError("no node URLs given")
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self._owners = itertools.count()
        self._session: Any = None
        self._plan = "remote"

    def describe(self) -> str:
        return self._plan

    async def __aenter__(self) -> RemoteCluster:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.request_timeout_s)
        )
        try:
            self._plan = await self._describe_plan()
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def models(self) -> list[str]:
        body = await self._get(self.urls[0] + "/v1/models")
        return [str(m.get("id")) for m in body.get("data", [])]

    async def _get(self, url: str) -> dict[str, Any]:
        import aiohttp

        try:
            async with asyncio.timeout(30.0), self._session.get(url) as response:
                response.raise_for_status()
                body: dict[str, Any] = await response.json()
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectionError(f"cannot reach {url}: {exc!r}") from exc

    async def _describe_plan(self) -> str:
        await self.models()  # fails early when the first node is unreachable
        try:
            view = await self._get(self.urls[0] + "/v1/cluster")
        except ConnectionError:
            return "remote"
        plan = view.get("plan") or {}
        stages = plan.get("stages") or []
        if not stages:
            return "remote (no plan)"
        return split_label([int(s["end"]) - int(s["start"]) for s in stages])

    async def generate(
        self, prompt: Prompt, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int
    ) -> Generation:
        url = self.urls[next(self._owners) % len(self.urls)] + "/v1/chat/completions"
        body = {
            "messages": [{"role": m.role, "content": m.content} for m in prompt.messages],
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
            "stream": False,
        }
        started = time.perf_counter()
        async with asyncio.timeout(self.request_timeout_s), self._session.post(url, json=body) as response:
            if response.status != 200:
                raise ServiceUnavailable(f"{url}: HTTP {response.status}: {(await response.text())[:200]}")
            reply: dict[str, Any] = await response.json()
        seconds = time.perf_counter() - started
        choice = reply["choices"][0]
        tokens = int(reply.get("usage", {}).get("completion_tokens", 0))
        return Generation(None, str(choice["message"]["content"] or ""), tokens, seconds, choice.get("finish_reason"))
