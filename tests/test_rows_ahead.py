"""Batched greedy steps queued ahead (StageCompute.pick_rows_ahead): the tokens of one evaluated batched step
at a time, whatever rows and tokens the next step brings; and the single-device scheduler's use of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from exo_stable.engine.batching import BatchMode
from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.stagecompute import StageCompute, prompt_chunks
from exo_stable.engine.synthetic import tiny_gguf

N_LAYERS = 4
ROWS = 4
# Which requests each step decodes: all four, then one pauses (its reader lags), comes back, two leave.
SCHEDULE = [(0, 1, 2, 3)] * 4 + [(0, 1, 2)] * 2 + [(0, 1, 2, 3)] * 3 + [(0, 2)] * 3 + [(2,)]


@pytest.fixture(scope="module")
def tiny(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("rows-ahead") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=9)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(4)
    return [[int(t) for t in rng.integers(0, 49152, size=n)] for n in (7, 30, 3, 150)]  # caches of four lengths


def _started(tiny: Path, mode: BatchMode, dtype: Dtype = Dtype.BFLOAT16) -> tuple[StageCompute, list[int]]:
    """A whole-model compute with the four requests' prompts read; their first tokens. (On a CPU, bfloat16's
    products are row-exact at four rows, which ``exact`` needs; float32's here only at three.)"""
    sc = StageCompute(open_model(tiny), LayerRange(0, N_LAYERS, N_LAYERS), dtype, batch=mode, batch_limit=ROWS)
    sc.load()
    assert sc.batch_limit == ROWS
    firsts = []
    for i, prompt in enumerate(_prompts()):
        sc.open(f"r{i}", SamplingParams())
        logits = None
        for chunk in prompt_chunks(prompt):
            logits = sc.forward(f"r{i}", mx.array([chunk], dtype=mx.int32))
        assert logits is not None
        firsts.append(sc.pick(f"r{i}", logits, 0))
    return sc, firsts


@pytest.mark.parametrize(("mode", "dtype"), [(BatchMode.EXACT, Dtype.BFLOAT16), (BatchMode.FAST, Dtype.FLOAT32)])
def test_rows_ahead_give_the_tokens_of_one_batched_step_at_a_time(tiny: Path, mode: BatchMode, dtype: Dtype) -> None:
    reference, last = _started(tiny, mode, dtype)
    expected: list[list[int]] = [[t] for t in last]
    for rows in SCHEDULE:
        picks = reference.decode_batch(
            [f"r{i}" for i in rows], [last[i] for i in rows], [len(expected[i]) for i in rows]
        )
        for i, picked in zip(rows, picks, strict=True):
            last[i] = picked.token
            expected[i].append(picked.token)
    assert all(len(set(tokens)) > 2 for tokens in expected), "the reference should not be degenerate"

    sc, last = _started(tiny, mode, dtype)
    got: list[list[int]] = [[t] for t in last]
    for step, rows in enumerate(SCHEDULE):
        coming = SCHEDULE[step + 1] if step + 1 < len(SCHEDULE) else ()
        # As the scheduler does: queue the rows it expects to go on, a subset of this step's (it cannot know
        # that request 3 comes back at step 6).
        follow = [k for k, i in enumerate(rows) if i in coming]
        rids, tokens = [f"r{i}" for i in rows], [last[i] for i in rows]
        picks = sc.pick_rows_ahead(rids, tokens, follow) if len(rows) > 1 else [sc.decode_local(rids[0], tokens[0], 1)]
        for i, picked in zip(rows, picks, strict=True):
            last[i] = picked
            got[i].append(picked)
    assert got == expected
    # Queued and used at steps 1-5 and 7-11. Step 5 queued rows (0, 1, 2), the ones it had that go on; step 6
    # brought request 3 back, so that step was undone. Step 11 queued nothing: one row goes on.
    assert sc.stats.rows_ahead == 10
    assert sc.stats.rows_undone == 1
    for i in range(ROWS):  # every cache holds exactly its prompt and the tokens fed
        request = sc.requests[f"r{i}"]
        assert request.tokens_in == len(_prompts()[i]) + len(got[i]) - 1
        assert all(c.offset == request.tokens_in for c in request.cache)


def test_a_different_token_or_a_closed_row_undoes_the_queued_step(tiny: Path) -> None:
    sc, last = _started(tiny, BatchMode.EXACT)
    rids = [f"r{i}" for i in range(ROWS)]
    picks = sc.pick_rows_ahead(rids, last, [0, 1, 2, 3])
    # A replay feeds request 1 another token than the queued step consumed: undone, computed afresh.
    fed = list(picks)
    fed[1] = (fed[1] + 1) % 1000
    again = sc.pick_rows_ahead(rids, fed, [0, 1, 2, 3])
    assert sc.stats.rows_undone == 1 and sc.stats.rows_ahead == 0
    assert all(sc.requests[r].tokens_in == sc.requests[r].cache[0].offset for r in rids)
    # Closing a row's request undoes the step queued for all of them; the others' caches give it back too.
    before = [sc.requests[r].tokens_in for r in rids[1:]]
    sc.close(rids[0])
    assert sc.stats.rows_undone == 2
    assert [sc.requests[r].tokens_in for r in rids[1:]] == [n - 1 for n in before]
    sc.pick_rows_ahead(rids[1:], again[1:], [])
    assert sc.stats.rows_ahead == 0


def test_only_greedy_rows_decode_ahead(tiny: Path) -> None:
    sc, last = _started(tiny, BatchMode.EXACT)
    sc.open("sampled", SamplingParams(temperature=0.8, seed=1))
    with pytest.raises(ValueError, match="greedy"):
        sc.pick_rows_ahead(["r0", "sampled"], [last[0], 5], [])


async def _collect(engine: SingleDeviceEngine, prompt: list[int], n: int, slow: bool = False) -> list[int]:
    out: list[int] = []
    async for token in engine.generate(prompt, SamplingParams(), n):
        out.append(token)
        if slow and len(out) % 3 == 0:
            # A reader that lags: the stream pauses while its buffer is full, so the batch's rows change.
            await asyncio.sleep(0.05)  # a lagging client, not synchronisation
    return out


def test_the_scheduler_queues_greedy_rows_ahead_and_keeps_lone_tokens(tiny: Path) -> None:
    prompts = _prompts()

    async def together() -> tuple[list[list[int]], int]:
        engine = SingleDeviceEngine(open_model(tiny), dtype=Dtype.BFLOAT16, batch=BatchMode.EXACT, batch_limit=ROWS)
        await engine.start()
        try:
            out = list(
                await asyncio.gather(
                    *(_collect(engine, p, 12 + 4 * i, slow=i == 1) for i, p in enumerate(prompts)),
                )
            )
            stats = engine._compute.stats
            return out, stats.rows_ahead
        finally:
            engine.close()

    async def alone(prompt: list[int], n: int) -> list[int]:
        engine = SingleDeviceEngine(open_model(tiny), dtype=Dtype.BFLOAT16, batch=BatchMode.OFF)
        await engine.start()
        try:
            return await _collect(engine, prompt, n)
        finally:
            engine.close()

    got, used = asyncio.run(together())
    assert got == [asyncio.run(alone(p, 12 + 4 * i)) for i, p in enumerate(prompts)]
    assert used > 0, "batched steps were queued ahead and used"
