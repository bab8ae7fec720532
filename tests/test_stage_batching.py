"""Continuous batching in the stages: concurrent requests share forward calls and keep their exact tokens.

The step queue's choices are checked table-driven (pure logic). Then real in-process nodes over sockets on
127.0.0.1 with a tiny random llama serve eight concurrent requests (greedy and seeded, owned by different
nodes) through 1, 2 and 3 stages: each answer must be exactly the single device's answer for that request
alone, and the stages must have run rows of several requests in one forward call. Under strict validation
with every step spot-checked, each batched row is recomputed alone and compared bit for bit (a live
exactness check of the batched forward call); with ``batch_limit=1`` the stages go one step at a time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from inproc_cluster import in_process_cluster

from exo_stable.api.metrics import stage_batching
from exo_stable.engine.batching import BatchMode
from exo_stable.engine.histogram import Histogram
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.node.node import Node
from exo_stable.pipeline.levels import ValidationLevel
from exo_stable.pipeline.service import GenerationJob, GenerationResult
from exo_stable.pipeline.stagebatch import ReadyStep, StepQueue
from exo_stable.wire.messages import StepHop, TensorPayload

N_LAYERS = 6
PROMPTS = [
    [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198],
    [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47],
    [1, 4093, 198, 504, 2362, 314, 253, 1345, 47, 2, 198],
    [1, 4093, 198, 7306, 1345, 6029],
]
SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=11)]
MAX_TOKENS = 10
JOBS = list(itertools.product(range(len(PROMPTS)), range(len(SAMPLINGS))))  # 8 concurrent requests


# ---- the step queue (pure) -------------------------------------------------------------------------------


def _step(rid: str, width: int = 1, step: int = 0) -> ReadyStep:
    return ReadyStep(rid, None, step, 0, True, 0.0, 0.0, tokens=tuple(range(width)))


def _rids(steps: tuple[ReadyStep, ...]) -> list[str]:
    return [s.rid for s in steps]


async def test_a_compute_step_takes_one_step_per_request_in_order() -> None:
    queue = StepQueue(16)
    for s in (_step("a"), _step("b"), _step("a", step=1), _step("c"), _step("d")):
        queue.put(s)
    work = queue.take(max_batch=3, token_budget=64)
    assert _rids(work.decode) == ["a", "b", "c"] and work.chunks == () and work.depth == 5
    work = queue.take(max_batch=3, token_budget=64)
    assert _rids(work.decode) == ["a", "d"] and work.decode[0].step == 1
    assert len(queue) == 0


async def test_prompt_chunks_share_the_step_budget_and_the_oldest_always_goes() -> None:
    queue = StepQueue(16)
    for s in (_step("p", 500), _step("a"), _step("q", 500), _step("b"), _step("p", 300, step=1)):
        queue.put(s)
    work = queue.take(max_batch=8, token_budget=512)
    # p's first chunk always goes; q's would pass the budget; p's second waits behind its first.
    assert _rids(work.chunks) == ["p"] and _rids(work.decode) == ["a", "b"]
    work = queue.take(max_batch=8, token_budget=512)
    assert _rids(work.chunks) == ["q"], "a chunk waits behind one compute step at most"
    assert _rids(queue.take(max_batch=8, token_budget=512).chunks) == ["p"]
    queue.put(_step("r", 600))
    assert _rids(queue.take(max_batch=8, token_budget=512).chunks) == ["r"], "a chunk over the budget alone goes"


async def test_no_chunk_is_taken_while_one_is_being_read() -> None:
    queue = StepQueue(16)
    for s in (_step("p", 100), _step("a"), _step("q", 100)):
        queue.put(s)
    work = queue.take(max_batch=8, token_budget=512, chunks=False)
    assert _rids(work.decode) == ["a"] and work.chunks == ()
    assert _rids(queue.take(max_batch=8, token_budget=512).chunks) == ["p", "q"]


async def test_one_at_a_time_when_the_batch_limit_is_one() -> None:
    queue = StepQueue(4)
    for rid in "abc":
        queue.put(_step(rid))
    assert [_rids(queue.take(max_batch=1, token_budget=512).decode) for _ in range(3)] == [["a"], ["b"], ["c"]]


async def test_the_queue_is_bounded_and_a_full_queue_makes_senders_wait() -> None:
    queue = StepQueue(2)
    queue.put(_step("a"))
    queue.put(_step("b"))
    with pytest.raises(RuntimeError):
        queue.put(_step("c"))
    with pytest.raises(TimeoutError):
        await queue.wait_room(0.05)
    waiter = asyncio.create_task(queue.wait_room(5.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    assert queue.discard("a") == 1
    await waiter  # room came
    queue.put(_step("c"))
    assert _rids(queue.take(max_batch=8, token_budget=8).decode) == ["b", "c"]


async def test_an_activation_step_is_as_wide_as_its_tensor() -> None:
    payload = TensorPayload.from_bytes("float32", (1, 3, 2), bytes(24))
    step = ReadyStep("a", None, 0, 0, True, 0.0, 0.0, tensor=payload)
    assert step.width == 3 and not step.is_decode and step.wire == ("float32", (1, 3, 2), bytes(24))


async def test_a_hop_from_a_peer_without_batching_reads_as_a_step_computed_alone() -> None:
    import msgspec

    old = {"node_id": "n", "stage": 0, "start": 0, "end": 2, "step": 1, "position": 0, "tokens": 1, "stage_s": 0.1}
    hop = msgspec.json.decode(msgspec.json.encode(old), type=StepHop)
    assert hop.batch == 1
    assert msgspec.json.decode(msgspec.json.encode(msgspec.structs.replace(hop, batch=4)), type=StepHop).batch == 4


async def test_histogram_buckets_are_cumulative() -> None:
    hist = Histogram((1, 2, 4))
    for v in (1, 1, 2, 3, 9):
        hist.observe(v)
    assert hist.cumulative() == [(1, 2), (2, 3), (4, 4), (float("inf"), 5)]
    assert hist.labelled("{:g}".format) == [("1", 2), ("2", 3), ("4", 4), ("+Inf", 5)]
    assert hist.count == 5 and hist.mean() == pytest.approx(16 / 5)


# ---- real nodes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("batching") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=9)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(tiny_model: Path) -> AsyncIterator[dict[tuple[int, int], list[int]]]:
    """Each request's token ids alone on a single device."""
    engine = SingleDeviceEngine(open_model(tiny_model), dtype=Dtype.FLOAT32)
    await engine.start()
    try:
        out = {(i, j): [t async for t in engine.generate(PROMPTS[i], SAMPLINGS[j], MAX_TOKENS)] for i, j in JOBS}
    finally:
        engine.close()
    assert len({tuple(ids) for ids in out.values()}) > 4, "the reference should tell the requests apart"
    yield out


@asynccontextmanager
async def cluster(model: Path, n: int, **options: Any) -> AsyncIterator[list[Node]]:
    """``n`` in-process nodes on 127.0.0.1 running an ``n``-stage plan; stopped when the block ends."""
    split = tuple(N_LAYERS // n + (1 if i < N_LAYERS % n else 0) for i in range(n))
    async with in_process_cluster(model, n, f"b{n}", split=split, timeout=300, **options) as (nodes, _):
        yield nodes


async def run_one(
    node: Node, prompt: list[int], params: SamplingParams, max_tokens: int = MAX_TOKENS, started: Any = None
) -> list[int]:
    """One request's token ids; ``started`` (an asyncio.Event) is set once it has its third token."""
    result = GenerationResult(prompt_tokens=len(prompt))
    async with aclosing(node.owner.stream(GenerationJob(prompt, params, max_tokens))) as deltas:
        async for delta in deltas:
            result.add(delta)
            if started is not None and len(result.token_ids) >= 3:
                started.set()
    return result.token_ids


async def run_concurrently(nodes: list[Node]) -> list[list[int]]:
    async with asyncio.timeout(240):
        return list(
            await asyncio.gather(
                *(run_one(nodes[k % len(nodes)], PROMPTS[i], SAMPLINGS[j]) for k, (i, j) in enumerate(JOBS))
            )
        )


def stage_snapshots(nodes: list[Node]) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        actor = node.stage_host.actor
        assert actor is not None
        out.append(actor.snapshot())
    return out


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.parametrize("n_stages", [1, 2, 3])
async def test_concurrent_requests_batched_equal_each_request_alone(
    tiny_model: Path, reference: dict[tuple[int, int], list[int]], n_stages: int
) -> None:
    async with cluster(tiny_model, n_stages) as nodes:
        results = await run_concurrently(nodes)
        for (i, j), ids in zip(JOBS, results, strict=True):
            assert ids == reference[i, j], f"prompt {i}, sampling {j} through {n_stages} stages"
        snaps = stage_snapshots(nodes)
        batched = sum(s["batching"]["batched_rows"] for s in snaps)
        assert batched > 0, f"eight concurrent requests never shared a forward call: {snaps}"
        for node in nodes:
            assert node.owner.requests == {}
            assert node.stage_host.actor is not None
            await node.stage_host.actor.wait_idle(timeout=30)
            assert node.stage_host.actor.queued_steps == 0
        families = {
            f.name: f for node in nodes if (st := node.statistics().stage) is not None for f in stage_batching(st)
        }
        sizes = families["exo_stable_stage_batch_size"].samples
        assert any(s.name.endswith("_count") and s.value > 0 for s in sizes)
        assert "exo_stable_stage_queue_depth" in families and "exo_stable_stage_queued_steps" in families


async def test_strict_spot_checks_recompute_batched_rows_alone_and_agree(
    tiny_model: Path, reference: dict[tuple[int, int], list[int]]
) -> None:
    options = {"validation": ValidationLevel.STRICT, "spot_check_fraction": 1.0, "adaptive_validation": False}
    async with cluster(tiny_model, 3, **options) as nodes:
        results = await run_concurrently(nodes)
        for (i, j), ids in zip(JOBS, results, strict=True):
            assert ids == reference[i, j]
        snaps = stage_snapshots(nodes)
        assert sum(s["batching"]["batched_rows"] for s in snaps) > 0
        for s in snaps:
            validation = s["validation"]
            assert validation["spot_checks"] > 0 and validation["spot_check_mismatches"] == 0


async def test_one_step_at_a_time_when_batching_is_off(
    tiny_model: Path, reference: dict[tuple[int, int], list[int]]
) -> None:
    async with cluster(tiny_model, 2, batch_limit=1) as nodes:
        results = await run_concurrently(nodes)
        for (i, j), ids in zip(JOBS, results, strict=True):
            assert ids == reference[i, j]
        for s in stage_snapshots(nodes):
            batching = s["batching"]
            assert batching["batched_rows"] == 0 and batching["batch_size"]["1"] == batching["forward_calls"] > 0


async def test_fast_batching_through_three_stages_uses_shared_buffers(
    tiny_model: Path, reference: dict[tuple[int, int], list[int]]
) -> None:
    """``--batch fast``: every stage keeps its batched requests' caches in one buffer per layer. Rows may round
    differently than alone, so only what is exact is compared: each answer's length and first token (the
    prompt is read by lone calls)."""
    async with cluster(tiny_model, 3, batch=BatchMode.FAST) as nodes:
        results = await run_concurrently(nodes)
        for (i, j), ids in zip(JOBS, results, strict=True):
            assert len(ids) == len(reference[i, j]) and ids[:1] == reference[i, j][:1], (i, j)
        snaps = stage_snapshots(nodes)
        assert sum(s["batching"]["batched_rows"] for s in snaps) > 0
        assert all(s["batching"]["shared_buffer_calls"] > 0 for s in snaps), snaps
        for node in nodes:
            assert node.owner.requests == {}
            actor = node.stage_host.actor
            assert actor is not None
            await actor.wait_idle(timeout=30)


@pytest.mark.parametrize("n_stages", [1, 2])
async def test_a_long_prompt_is_read_in_slices_beside_decoding_requests(tiny_model: Path, n_stages: int) -> None:
    """A 700-token prompt arriving while four requests decode: its chunks' layers are evaluated a few per
    compute step (engine.slicing), and every answer, its own included, is the single device's alone."""
    long_prompt = [1 + (i * 7919) % 40000 for i in range(700)]
    jobs = [(PROMPTS[i], SAMPLINGS[i % 2], 30) for i in range(4)]
    engine = SingleDeviceEngine(open_model(tiny_model), dtype=Dtype.FLOAT32, batch=BatchMode.OFF)
    await engine.start()
    try:
        expected = [[t async for t in engine.generate(p, q, n)] for p, q, n in [*jobs, (long_prompt, SAMPLINGS[0], 5)]]
    finally:
        engine.close()
    async with cluster(tiny_model, n_stages) as nodes:
        decoding = [asyncio.Event() for _ in jobs]

        async def late() -> list[int]:
            for event in decoding:
                await event.wait()
            return await run_one(nodes[-1], long_prompt, SAMPLINGS[0], 5)

        async with asyncio.timeout(240):
            results = await asyncio.gather(
                *(run_one(nodes[k % n_stages], p, q, n, decoding[k]) for k, (p, q, n) in enumerate(jobs)), late()
            )
        assert list(results) == expected
        snaps = stage_snapshots(nodes)
        assert all(s["batching"]["prompt_slices"] > 0 for s in snaps), snaps


async def test_a_node_alone_queues_batched_greedy_steps_ahead(
    tiny_model: Path, reference: dict[tuple[int, int], list[int]]
) -> None:
    """A one-stage plan holds the whole model: the batched step of its greedy requests is queued on the device
    before the last one's tokens are read (StageCompute.pick_rows_ahead), and each answer stays the single
    device's for that request alone."""
    async with cluster(tiny_model, 1) as nodes:
        async with asyncio.timeout(240):
            # Three: the stage's probe batches this model's float32 rows up to three (with a fourth request the
            # rows would rotate and the next turn never take the same rows).
            results = await asyncio.gather(*(run_one(nodes[0], PROMPTS[i], SAMPLINGS[0]) for i in range(3)))
        assert list(results) == [reference[i, 0] for i in range(3)]
        ahead = stage_snapshots(nodes)[0]["decode_ahead"]
        assert ahead["batched_steps"] > 0, ahead
