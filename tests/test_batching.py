"""Continuous batching: a request's tokens are the same whether it ran alone or beside others.

StageCompute.forward_batch's rows are compared bit for bit with lone forward calls on every stage of a split;
the single-device engine's scheduler runs concurrent requests (greedy and seeded, prompts of different
lengths, one closed mid-way, one joining mid-way) and each must yield exactly the tokens it yields alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from exo_stable.engine.batching import BatchMode, exact_limit
from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.slots import SlotRows
from exo_stable.engine.stagecompute import StageCompute
from exo_stable.engine.synthetic import tiny_gguf

N_LAYERS = 4
BOUNDS = [(0, 4), (0, 2), (2, 3), (3, 4)]


@pytest.fixture(scope="module")
def tiny(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("batching") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=5)


def _input(first: bool, length: int, hidden: int, dtype: Dtype, rng: np.random.Generator) -> mx.array:
    if first:
        return mx.array([[int(t) for t in rng.integers(0, 49152, size=length)]], dtype=mx.int32)
    act = mx.float32 if dtype is Dtype.FLOAT32 else mx.bfloat16
    return mx.array(rng.standard_normal((1, length, hidden)).astype(np.float32)).astype(act)


@pytest.mark.parametrize("dtype", [Dtype.FLOAT32, Dtype.BFLOAT16])
@pytest.mark.parametrize("bounds", BOUNDS)
def test_forward_batch_rows_equal_lone_rows(tiny: Path, dtype: Dtype, bounds: tuple[int, int]) -> None:
    source = open_model(tiny)
    lone = StageCompute(source, LayerRange(*bounds, N_LAYERS), dtype, batch=BatchMode.OFF)
    batched = StageCompute(source, LayerRange(*bounds, N_LAYERS), dtype, batch=BatchMode.EXACT, batch_limit=5)
    lone.load()
    batched.load()
    limit = batched.batch_limit
    assert lone.batch_limit == 1 and 2 <= limit <= 5
    rng = np.random.default_rng(1)
    rids = [f"r{i}" for i in range(7)]  # more than the limit: two forward calls
    for i, rid in enumerate(rids):
        x = _input(bounds[0] == 0, 3 + 5 * i, 64, dtype, rng)  # each request at its own length
        for sc in (lone, batched):
            sc.open(rid, SamplingParams())
            sc.forward(rid, x)
    for _ in range(3):
        xs = [_input(bounds[0] == 0, 1, 64, dtype, rng) for _ in rids]
        alone = [lone.forward(rid, x) for rid, x in zip(rids, xs, strict=True)]
        rows = batched.forward_batch(rids, xs)
        for a, b in zip(alone, rows, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert mx.array_equal(a, b).item(), "a batched row differs from the lone step"
    parts = [min(limit, 7 - start) for start in range(0, 7, limit)]  # 7 requests, at most ``limit`` a call
    assert batched.stats.batched_calls == 3 * sum(1 for n in parts if n > 1)
    assert [r.tokens_in for r in batched.requests.values()] == [r.tokens_in for r in lone.requests.values()]


@pytest.mark.parametrize("bounds", [(0, 4), (2, 4)])
def test_fast_mode_rows_share_one_buffer_and_match_lone_rows_closely(
    tiny: Path, bounds: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--batch fast``: a request moves its cache into a slot of one buffer per layer when it first shares a
    step, and a batched step of slotted rows attends in one masked call; each row stays within rounding of
    its lone computation, lone calls use a slot as a cache of its own, and a freed slot serves a new one."""
    source = open_model(tiny)
    lone = StageCompute(source, LayerRange(*bounds, N_LAYERS), Dtype.FLOAT32, batch=BatchMode.OFF)
    fast = StageCompute(
        source, LayerRange(*bounds, N_LAYERS), Dtype.FLOAT32, batch=BatchMode.FAST, batch_limit=4, max_requests=6
    )
    lone.load()
    fast.load()
    shared_calls: list[int] = []
    attend = SlotRows.attend

    def counted(self: SlotRows, queries: mx.array, scale: float) -> mx.array:
        shared_calls.append(queries.shape[0])
        return attend(self, queries, scale)

    monkeypatch.setattr(SlotRows, "attend", counted)
    rng = np.random.default_rng(3)
    rids = [f"r{i}" for i in range(5)]  # one more than the slots: r4 keeps a cache of its own

    def check(a: mx.array, b: mx.array) -> None:
        assert a.shape == b.shape
        assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4), float(mx.max(mx.abs(a - b)).item())

    for i, rid in enumerate(rids):
        x = _input(bounds[0] == 0, 2 + 7 * i, 64, Dtype.FLOAT32, rng)  # each request at its own length
        lone.open(rid, SamplingParams())
        fast.open(rid, SamplingParams())
        check(lone.forward(rid, x), fast.forward(rid, x))
    assert all(fast.requests[r].slot is None for r in rids), "a request alone keeps a cache of its own"
    for step in range(4):
        if step == 2:  # a request leaves; a new one takes its slot, reading its own prompt alone first
            for sc in (lone, fast):
                sc.close("r1")
            rids.remove("r1")
            x = _input(bounds[0] == 0, 9, 64, Dtype.FLOAT32, rng)
            for sc in (lone, fast):
                sc.open("new", SamplingParams())
            check(lone.forward("new", x), fast.forward("new", x))
            rids.append("new")
        # The slotted rows in one call (one attention call a layer), then with r4 (its own cache: row by row).
        slotted = [r for r in rids if r != "r4"]
        for batch in (slotted, [*slotted[:3], "r4"]):
            xs = [_input(bounds[0] == 0, 1, 64, Dtype.FLOAT32, rng) for _ in batch]
            alone = [lone.forward(rid, x) for rid, x in zip(batch, xs, strict=True)]
            for a, b in zip(alone, fast.forward_batch(batch, xs), strict=True):
                check(a, b)
            # Requests move into slots when they first share a step; r4 finds none free (four slots).
            want = {"r0": 0, "r1": 1, "r2": 2, "r3": 3, "new": 1, "r4": None}
            assert {r: fast.requests[r].slot for r in rids} == {r: want[r] for r in rids}
    layers = bounds[1] - bounds[0]
    assert shared_calls == [4] * layers * 4, shared_calls
    assert fast.stats.batched_calls == 8
    assert fast.kv_cache_bytes() >= lone.kv_cache_bytes() > 0  # the shared buffers count whole


def test_exact_mode_batches_only_what_the_probe_found_exact(tiny: Path) -> None:
    sc = StageCompute(open_model(tiny), LayerRange(0, N_LAYERS, N_LAYERS), Dtype.FLOAT32, batch_limit=12)
    sc.load()
    assert sc.batch_limit == exact_limit(sc.probe_rows(12)) >= 1
    assert exact_limit({2: True, 3: True, 4: False, 5: True}) == 3
    assert exact_limit({2: False}) == 1


def test_a_stage_loaded_again_reuses_the_probe(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs once per product shape in a process: a stage built again (a new plan, a failover's
    survivor) takes the answer already found instead of paying for the probe again."""
    from exo_stable.engine import batching

    monkeypatch.setattr(batching, "_PROBED", {})
    first = StageCompute(open_model(tiny), LayerRange(0, 2, N_LAYERS), Dtype.BFLOAT16, batch_limit=8)
    first.load()
    assert first.batch_limit > 1 and batching._PROBED
    for sizes in batching._PROBED.values():  # pretend every product differed from 2 rows on
        sizes.update(dict.fromkeys(sizes, False))
    again = StageCompute(open_model(tiny), LayerRange(2, N_LAYERS, N_LAYERS), Dtype.BFLOAT16, batch_limit=8)
    again.load()
    assert again.batch_limit == 1


async def _collect(
    engine: SingleDeviceEngine, prompt: list[int], params: SamplingParams, n: int, decoding: asyncio.Event | None = None
) -> list[int]:
    out: list[int] = []
    async for t in engine.generate(prompt, params, n):
        out.append(t)
        if decoding is not None and len(out) == 5:
            decoding.set()
    return out


async def _cancelled(engine: SingleDeviceEngine, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    out: list[int] = []
    async for t in engine.generate(prompt, params, 40):
        out.append(t)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("dtype", [Dtype.FLOAT32, Dtype.BFLOAT16])
def test_engine_concurrent_requests_match_lone_runs(tiny: Path, dtype: Dtype) -> None:
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(0, 49152, size=n)] for n in (5, 40, 700, 13, 1100, 9)]
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, top_p=0.95, seed=11),
        SamplingParams(),
        SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(),
    ]

    async def run(batch: BatchMode) -> tuple[list[list[int]], int, int, int]:
        engine = SingleDeviceEngine(open_model(tiny), dtype=dtype, batch=batch, batch_limit=4, step_timeout_s=300)
        await engine.start()
        try:
            decoding = asyncio.Event()

            async def arrive_late() -> list[int]:
                async with asyncio.timeout(300):
                    await decoding.wait()  # joins once the others are decoding
                return await _collect(engine, prompts[5], params[5], 20)

            late = asyncio.create_task(arrive_late())
            jobs = [
                _cancelled(engine, p, q, 7) if i == 2 else _collect(engine, p, q, 24, decoding if i == 0 else None)
                for i, (p, q) in enumerate(zip(prompts[:5], params[:5], strict=True))
            ]  # request 2 leaves early
            out = [*await asyncio.gather(*jobs), await late]
            await engine.logits([1, 2])  # a job on the MLX thread: runs after the retired requests' closes
            stats = engine.batch_stats
            widest = stats.batch_size.largest() if stats else 0
            return out, engine.open_requests, widest, stats.prompt_slices if stats else 0
        finally:
            engine.close()

    together, left_open, widest, slices = asyncio.run(run(BatchMode.EXACT))
    alone = []
    for p, q, n in zip(prompts, params, (24, 24, 7, 24, 24, 20), strict=True):

        async def one(p: list[int] = p, q: SamplingParams = q, n: int = n) -> list[int]:
            engine = SingleDeviceEngine(open_model(tiny), dtype=dtype, batch=BatchMode.OFF, step_timeout_s=300)
            await engine.start()
            try:
                return await _collect(engine, p, q, n)
            finally:
                engine.close()

        alone.append(asyncio.run(one()))
    assert together == alone
    assert left_open == 0
    assert widest >= 2  # steps did batch
    assert slices > 0  # the long prompts' chunks were read a few layers per step beside the decode rows


def test_default_model_concurrent_requests_match_lone_runs(default_gguf: Path) -> None:
    """The default model (SmolLM2, float32 as a CPU serves it): four chats at once, each as it runs alone."""
    source = open_model(default_gguf)
    chats = ["Name three colours.", "What is 2+2?", "Write a haiku about rain.", "Say hello in French."]
    prompts = [source.tokenizer.encode(text) for text in chats]
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(), SamplingParams(seed=2)]

    async def run() -> tuple[list[list[int]], list[list[int]], int]:
        batched = SingleDeviceEngine(source, dtype=Dtype.FLOAT32, batch_limit=4)
        await batched.start()
        try:
            together = list(
                await asyncio.gather(*(_collect(batched, p, q, 12) for p, q in zip(prompts, params, strict=True)))
            )
            limit = batched.batch_limit
        finally:
            batched.close()
        lone = SingleDeviceEngine(open_model(default_gguf), dtype=Dtype.FLOAT32, batch=BatchMode.OFF)
        await lone.start()
        try:
            alone = [await _collect(lone, p, q, 12) for p, q in zip(prompts, params, strict=True)]
        finally:
            lone.close()
        return together, alone, limit

    together, alone, limit = asyncio.run(run())
    assert limit == 4, "SmolLM2's float32 products are row-exact at 4 rows on a CPU"
    assert together == alone
