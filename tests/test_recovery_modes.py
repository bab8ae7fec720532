"""Replay modes, the single-device fallback and plans that change under running requests (in-process nodes).

Every node here is a real :class:`Node` (its actors, its links over real sockets, its HTTP API) on a tiny
random-weight llama, so each scenario takes seconds. A node leaves by being stopped (its links close and
the others see it go), as in ``test_recovery.py``.

- exact replay: the answer after recovery equals the uninterrupted run; fast replay: one batched re-prefill
  (the stages feed no token one by one), the text before the fault unchanged, positions consecutive;
- catastrophic: no plan fits the survivors: the owner falls back to its single device when its memory
  holds the model (the answer goes on, exact), else the stream ends with an explicit error event;
- back to health: a request running while a node joins keeps its plan; the next one uses the new plan.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from sse import DONE, sse_events

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.node.node import Node, NodeConfig
from exo_stable.pipeline.recovery import ReplayMode
from exo_stable.pipeline.service import GenerationJob, GenerationResult

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

PROMPT = [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198]
MAX_TOKENS = 24
GREEDY = SamplingParams()
# The tiny model (6 layers, hidden 64) needs about 52 MB whole and 27 MB per stage of two (weights and the KV
# reserve of 8 requests at its 2048-token context, see exo_stable/engine/footprint.py).
ROOMY = 1 << 30
HALF_ONLY = 36 << 20


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("modes") / "tiny.gguf", default_gguf, layers=6, seed=9)


async def reference(model: Path, params: SamplingParams = GREEDY, max_tokens: int = MAX_TOKENS) -> list[int]:
    engine = SingleDeviceEngine(open_model(model), dtype=Dtype.FLOAT32)
    await engine.start()
    try:
        return [t async for t in engine.generate(PROMPT, params, max_tokens)]
    finally:
        engine.close()


@dataclass
class Members:
    nodes: list[Node]
    stops: list[asyncio.Event]
    tg: asyncio.TaskGroup
    model: Path
    prefix: str

    async def start(self, memory: int, split: tuple[int, ...] | None = None) -> Node:
        """Start one more node and link it to node 0."""
        i = len(self.nodes)
        config = NodeConfig(
            model=self.model, dtype=Dtype.FLOAT32, port=0, node_id=f"{self.prefix}{i}", memory_bytes=memory, split=split
        )
        node, stop = Node(config, open_model(self.model)), asyncio.Event()
        self.nodes.append(node)
        self.stops.append(stop)
        self.tg.create_task(node.run(stop=stop, handle_signals=False))
        await node.wait_listening(timeout=60)
        if i:
            node.peers.dial("127.0.0.1", self.nodes[0].port)
        return node

    async def wait_stages(self, n: int) -> None:
        for node in self.nodes:
            if not self.stops[self.nodes.index(node)].is_set():
                await node.coordinator.wait_plan_where(lambda p: len(p.stages) == n, timeout=60)


@asynccontextmanager
async def members(model: Path, prefix: str) -> AsyncIterator[Members]:
    async with asyncio.timeout(240), asyncio.TaskGroup() as tg:
        m = Members([], [], tg, model, prefix)
        try:
            yield m
        finally:
            for stop in m.stops:
                stop.set()


async def run_and_stop(
    owner: Node, victim: asyncio.Event, job: GenerationJob, after: int = 6
) -> tuple[GenerationResult, str, int]:
    """Stream ``job`` from ``owner``; set ``victim`` (a node leaves) once ``after`` tokens are in."""
    result = GenerationResult(prompt_tokens=len(job.prompt_ids))
    text, before = "", 0
    async with aclosing(owner.owner.stream(job)) as deltas:
        async for delta in deltas:
            text += result.add(delta).text
            if not before and len(result.token_ids) >= after:
                before = len(result.token_ids)
                victim.set()
    return result, text, before


async def test_exact_replay_equals_the_uninterrupted_run_and_fast_replay_re_prefills_once(tiny_model: Path) -> None:
    expected = await reference(tiny_model)
    tok = open_model(tiny_model).tokenizer
    async with members(tiny_model, "rm") as m:
        for _ in range(3):
            await m.start(ROOMY)
        await m.wait_stages(3)
        owner = m.nodes[0]

        # Exact: node 2 (the last stage) leaves; the survivors' new last stage feeds the history forward.
        exact = GenerationJob(PROMPT, GREEDY, MAX_TOKENS, replay=ReplayMode.EXACT)
        result, text, before = await run_and_stop(owner, m.stops[2], exact)
        assert before >= 6
        assert result.token_ids == expected, "exact replay: the whole answer equals the uninterrupted run"
        assert text == tok.decode(result.token_ids)
        last = m.nodes[1].stage_host.actor
        assert last is not None and last.stats.replayed >= before, "the known tokens were fed one by one"

        # Fast: node 1 leaves too; node 0 alone re-prefills prompt + history in one go.
        await owner.coordinator.wait_plan_where(lambda p: len(p.stages) == 2, timeout=60)
        fast = GenerationJob(PROMPT, GREEDY, MAX_TOKENS, replay=ReplayMode.FAST)
        result, text, before = await run_and_stop(owner, m.stops[1], fast)
        assert before >= 6
        ids = result.token_ids
        assert ids[:before] == expected[:before], "the text before the fault is unchanged"
        assert len(ids) == len(expected) or result.finish_reason == "stop", (ids, result.finish_reason)
        assert text == tok.decode(ids), "every position exactly once, in order"
        alone = owner.stage_host.actor
        assert alone is not None and alone.stats.replayed == 0, "fast replay feeds no token one by one"

        snap = owner.owner.snapshot()
        assert snap["recoveries"] == 2, snap
        by_mode = snap["recovery"]["resume_by_mode"]
        assert by_mode["exact"]["n"] == 1 and by_mode["fast"]["n"] == 1, by_mode


async def test_the_owner_falls_back_to_its_single_device_when_no_plan_fits(tiny_model: Path) -> None:
    """A forced two-stage split loses a node: no plan fits the one survivor, whose memory holds the model."""
    expected = await reference(tiny_model)
    async with members(tiny_model, "fb") as m:
        for _ in range(2):
            await m.start(ROOMY, split=(3, 3))
        await m.wait_stages(2)
        owner = m.nodes[0]
        result, _, before = await run_and_stop(owner, m.stops[1], GenerationJob(PROMPT, GREEDY, MAX_TOKENS))
        assert before >= 6
        assert result.token_ids == expected, "exact replay on the fallback: the answer equals the uninterrupted run"
        snap = owner.owner.snapshot()
        assert snap["fallbacks"] == 1, snap
        assert snap["recovery"]["classes"].get("catastrophic") == 1, snap["recovery"]
        assert snap["recovery"]["mechanisms"].get("fallback") == 1, snap["recovery"]
        assert snap["recovery"]["outcomes"].get("fallback") == 1, snap["recovery"]
        assert snap["fallback"]["loaded"] and snap["fallback"]["replayed_tokens"] >= before


async def test_no_plan_and_no_room_for_the_whole_model_ends_the_stream_with_an_error(tiny_model: Path) -> None:
    """Two nodes that each hold only half the model; one leaves mid-stream: an error event, then [DONE]."""
    async with members(tiny_model, "nf") as m:
        for _ in range(2):
            await m.start(HALF_ONLY)
        await m.wait_stages(2)
        body = {
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
            "exo_replay": "fast",
        }
        events: list[dict[str, object]] = []
        lines: list[str] = []
        url = f"http://127.0.0.1:{m.nodes[0].port}/v1/chat/completions"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.post(url, json={**body, "exo_replay": "sideways"}) as resp:
                assert resp.status == 400, await resp.text()
                assert "exo_replay" in (await resp.json())["error"]["message"]
            async with http.post(url, json=body) as resp:
                assert resp.status == 200
                async for event in sse_events(resp, lines):
                    events.append(event)
                    if len(events) == 4:
                        m.stops[1].set()
        assert lines[-1] == DONE
        errors = [e for e in events if "error" in e]
        assert len(errors) == 1, events[-3:]
        message = str(errors[0]["error"])
        assert "no pipeline plan fits" in message and "cannot hold the model" in message, message
        assert not any(c["finish_reason"] for e in events if "choices" in e for c in e["choices"])  # type: ignore[attr-defined]
        snap = m.nodes[0].owner.snapshot()
        assert snap["failed"] == 1 and snap["recovery"]["classes"].get("catastrophic") == 1, snap


async def test_a_request_keeps_its_plan_while_a_node_joins_and_the_next_one_uses_the_new_plan(
    tiny_model: Path,
) -> None:
    expected = await reference(tiny_model, max_tokens=64)
    async with members(tiny_model, "jn") as m:
        for _ in range(2):
            await m.start(ROOMY)
        await m.wait_stages(2)
        owner = m.nodes[0]
        first_plan = owner.coordinator.active
        assert first_plan is not None
        result = GenerationResult(prompt_tokens=len(PROMPT))
        joined_epoch = None
        async with aclosing(owner.owner.stream(GenerationJob(PROMPT, GREEDY, 64))) as deltas:
            async for delta in deltas:
                result.add(delta)
                if joined_epoch is None and len(result.token_ids) >= 3:
                    # The request is running: a third node joins and a 3-stage plan is committed meanwhile.
                    await m.start(ROOMY)
                    plan = await owner.coordinator.wait_plan_where(lambda p: len(p.stages) == 3, timeout=60)
                    joined_epoch = plan.epoch
                    assert owner.owner.requests, "the request is still running"
                    (running,) = owner.owner.requests.values()
                    assert running.plan.epoch == first_plan.epoch, "it keeps the plan it started with"
        assert joined_epoch is not None and joined_epoch > first_plan.epoch
        assert result.token_ids == expected
        snap = owner.owner.snapshot()
        assert snap["recoveries"] == 0 and snap["kept_plan"] >= 1, snap

        # The next request runs on the new plan: the new node's stage computes its steps.
        newcomer = m.nodes[2].stage_host.actor
        assert newcomer is not None and newcomer.stats.steps == 0
        second = GenerationResult(prompt_tokens=len(PROMPT))
        async with aclosing(owner.owner.stream(GenerationJob(PROMPT, GREEDY, MAX_TOKENS))) as deltas:
            async for delta in deltas:
                second.add(delta)
        assert second.token_ids == expected[:MAX_TOKENS]
        assert newcomer.stats.steps > 0
        for node in m.nodes[:2]:  # the replaced plan's stages drained and stopped
            assert node.stage_host.draining == 0
