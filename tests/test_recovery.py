"""A node leaves mid-answer and the answer goes on (I2, I6): in-process nodes over real sockets.

The request's owner notices the node going down, waits for the survivors' new plan, replays the request on
it (the prompt, then every token it already has, one decode step each) and continues the stream from the
next position: the whole answer equals an uninterrupted single-device run, with no position lost or
repeated.
"""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import pytest
from inproc_cluster import in_process_cluster

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.pipeline.service import GenerationJob, GenerationResult

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("recovery") / "tiny.gguf", default_gguf, layers=6, seed=9)


async def reference(model: Path, params: SamplingParams) -> list[int]:
    engine = SingleDeviceEngine(open_model(model), dtype=Dtype.FLOAT32)
    await engine.start()
    try:
        return [t async for t in engine.generate(PROMPT, params, MAX_TOKENS)]
    finally:
        engine.close()


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_k=50, seed=3)])
@pytest.mark.parametrize("victim", [1, 2])  # a middle stage and the last stage
async def test_a_stage_leaving_mid_stream_does_not_lose_the_answer(
    tiny_model: Path, params: SamplingParams, victim: int
) -> None:
    expected = await reference(tiny_model, params)
    async with in_process_cluster(tiny_model, 3, f"rc{victim}", memory_bytes=1 << 30) as (nodes, stops):
        plan = await nodes[0].coordinator.wait_plan_where(lambda p: len(p.stages) == 3, timeout=60)
        assert [s.node_id for s in plan.stages] == [n.node_id for n in nodes]

        owner = nodes[0]
        result = GenerationResult(prompt_tokens=len(PROMPT))
        text = ""
        delivered_before = 0
        async with aclosing(owner.owner.stream(GenerationJob(PROMPT, params, MAX_TOKENS))) as deltas:
            async for delta in deltas:
                text += result.add(delta).text
                if delivered_before == 0 and len(result.token_ids) >= 6:
                    delivered_before = len(result.token_ids)
                    stops[victim].set()  # the node leaves: its links close, the others see it go
        assert delivered_before >= 6
        assert owner.owner.stats.recoveries >= 1, "the request went through a recovery"
        assert result.token_ids == expected, "the whole answer equals the uninterrupted single-device run"
        assert text == owner.source.tokenizer.decode(expected)
        final = owner.coordinator.active
        assert final is not None and nodes[victim].node_id not in {s.node_id for s in final.stages}
