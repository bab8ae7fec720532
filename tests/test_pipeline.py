"""I1, I2, I3 on real nodes: in-process nodes over real sockets on 127.0.0.1 with a tiny random llama.

Every split point of an 8-layer model with 2 and with 3 stages, and one node holding it all (which decodes
greedy requests a step ahead), greedy and seeded, must give exactly the single device's token ids; so must
several requests running through the pipeline at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.node.node import Node, NodeConfig
from exo_stable.pipeline.service import GenerationJob, GenerationResult

pytestmark = pytest.mark.asyncio(loop_scope="module")

N_LAYERS = 8
PROMPTS = [
    [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198],
    [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47],
]
SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=11)]
MAX_TOKENS = 12


@dataclass
class Cluster:
    nodes: list[Node]
    stop: asyncio.Event

    async def run(self, node: Node, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
        result = GenerationResult(prompt_tokens=len(prompt))
        text = ""
        owner = node.owner
        async with aclosing(owner.stream(GenerationJob(prompt, params, MAX_TOKENS))) as deltas:
            async for delta in deltas:
                text += result.add(delta).text
        return result.token_ids, text


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("pipeline") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(tiny_model: Path) -> AsyncIterator[dict[tuple[int, int], list[int]]]:
    """Single-device token ids for every (prompt, sampling) pair."""
    engine = SingleDeviceEngine(open_model(tiny_model), dtype=Dtype.FLOAT32)
    await engine.start()
    out: dict[tuple[int, int], list[int]] = {}
    try:
        for (i, prompt), (j, params) in itertools.product(enumerate(PROMPTS), enumerate(SAMPLINGS)):
            out[i, j] = [t async for t in engine.generate(prompt, params, MAX_TOKENS)]
    finally:
        engine.close()
    assert any(len(set(ids)) > 2 for ids in out.values()), "the reference should not be degenerate"
    return out


async def start_cluster(model: Path, n: int, split: tuple[int, ...]) -> Cluster:
    stop = asyncio.Event()
    source = open_model(model)
    nodes: list[Node] = []
    for i in range(n):
        config = NodeConfig(model=model, dtype=Dtype.FLOAT32, port=0, node_id=f"t{n}-{i}", split=split)
        node = Node(config, source if i == 0 else open_model(model))
        nodes.append(node)
        _TASKS.append(asyncio.create_task(node.run(stop=stop, handle_signals=False)))
    first = await nodes[0].wait_listening(timeout=60)
    for node in nodes[1:]:
        await node.wait_listening(timeout=60)
        node.peers.dial("127.0.0.1", first)
    async with asyncio.timeout(60):
        for node in nodes:
            await node.coordinator.wait_plan_where(lambda p: len(p.stages) == n, timeout=60)
    return Cluster(nodes, stop)


_TASKS: list[asyncio.Task[None]] = []


async def stop_cluster(cluster: Cluster) -> None:
    cluster.stop.set()
    async with asyncio.timeout(60):
        await asyncio.gather(*_TASKS)
    _TASKS.clear()


async def resplit(cluster: Cluster, split: tuple[int, ...]) -> None:
    leader = min(cluster.nodes, key=lambda nd: nd.node_id)
    leader.coordinator.force_split(split)
    for node in cluster.nodes:
        await node.coordinator.wait_plan_where(lambda p: tuple(s.end - s.start for s in p.stages) == split, timeout=60)


def splits(n_stages: int) -> list[tuple[int, ...]]:
    out = []
    for cuts in itertools.combinations(range(1, N_LAYERS), n_stages - 1):
        bounds = (0, *cuts, N_LAYERS)
        out.append(tuple(b - a for a, b in itertools.pairwise(bounds)))
    return out


@pytest.mark.parametrize("n_stages", [1, 2, 3])  # one stage: the whole model, decoding ahead
async def test_every_split_point_equals_the_single_device(
    tiny_model: Path, reference: dict[tuple[int, int], list[int]], n_stages: int
) -> None:
    all_splits = splits(n_stages)
    cluster = await start_cluster(tiny_model, n_stages, all_splits[0])
    try:
        for split in all_splits:
            await resplit(cluster, split)
            for (i, prompt), (j, params) in itertools.product(enumerate(PROMPTS), enumerate(SAMPLINGS)):
                owner_node = cluster.nodes[(i + j) % n_stages]  # any node can own a request
                ids, _ = await cluster.run(owner_node, prompt, params)
                assert ids == reference[i, j], f"split {split}, prompt {i}, sampling {j}"
        if n_stages == 1:  # the greedy runs' steps were queued before their tokens were read
            actor = cluster.nodes[0].stage_host.actor
            assert actor is not None and actor.snapshot()["decode_ahead"]["steps"] >= MAX_TOKENS - 2
        # Every stage of the last split built its decode steps before their inputs came (a whole-model stage:
        # those of the sampled runs, the greedy ones being queued ahead instead).
        runs = len(PROMPTS) * (1 if n_stages == 1 else len(SAMPLINGS))
        for node in cluster.nodes:
            actor = node.stage_host.actor
            assert actor is not None
            assert actor.snapshot()["build_ahead"]["used"] >= (MAX_TOKENS - 2) * runs
        print(f"\n{n_stages} stages: {len(all_splits)} splits x {len(PROMPTS) * len(SAMPLINGS)} runs identical")
    finally:
        await stop_cluster(cluster)


async def test_concurrent_requests_interleave_and_stay_identical(
    tiny_model: Path, reference: dict[tuple[int, int], list[int]]
) -> None:
    cluster = await start_cluster(tiny_model, 3, (3, 3, 2))
    try:
        jobs = [(i, j) for i in range(len(PROMPTS)) for j in range(len(SAMPLINGS))] * 2
        async with asyncio.timeout(120):
            results = await asyncio.gather(
                *(cluster.run(cluster.nodes[k % 3], PROMPTS[i], SAMPLINGS[j]) for k, (i, j) in enumerate(jobs))
            )
        for (i, j), (ids, text) in zip(jobs, results, strict=True):
            assert ids == reference[i, j]
            assert text == cluster.nodes[0].source.tokenizer.decode(ids)
        for node in cluster.nodes:
            assert node.owner.requests == {}, "per-request state is freed"
            assert node.stage_host.actor is not None
            await node.stage_host.actor.wait_idle(timeout=30)  # RequestClose is on its way over the links
            assert node.stage_host.actor.open_requests == 0
            # Serving several requests at once, a stage does not build steps ahead (it would idle the device).
            assert node.stage_host.actor.snapshot()["build_ahead"]["skipped_busy"] > 0
    finally:
        await stop_cluster(cluster)
