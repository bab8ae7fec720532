"""A request started while its plan's stages load a newer plan waits for that plan, then runs on it.

A node joining (or leaving) makes the leader propose a new plan; each stage loads its part of it and stops
the committed plan's stage (one model's layers at a time in memory) before the new plan is committed. A
request started in that window is refused by the stages (they hold no stage of its plan any more); it must
wait for the new plan and give the single-device answer, not fail at once (CI saw it fail in 10 ms after six
immediate retries of the same plan). In-process nodes over real sockets; the joining node's loading is held
until the test has started the request.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path

import pytest
from hostile_peer import eventually
from inproc_cluster import in_process_cluster

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.node.node import Node, NodeConfig
from exo_stable.pipeline.recovery import FailureKind
from exo_stable.pipeline.service import GenerationJob, GenerationResult
from exo_stable.wire.messages import StageRange

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198]
MAX_TOKENS = 16
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("openload") / "tiny.gguf", default_gguf, layers=6, seed=11)


async def test_a_request_started_while_its_stages_load_a_new_plan_runs_on_that_plan(tiny_model: Path) -> None:
    engine = SingleDeviceEngine(open_model(tiny_model), dtype=Dtype.FLOAT32)
    await engine.start()
    try:
        expected = [t async for t in engine.generate(PROMPT, SamplingParams(), MAX_TOKENS)]
    finally:
        engine.close()

    async with in_process_cluster(tiny_model, 2, "ol", memory_bytes=1 << 30) as (nodes, _):
        old = nodes[0].coordinator.active
        assert old is not None and len(old.stages) == 2
        first_port = await nodes[0].wait_listening(timeout=DEADLINE_S)
        config = NodeConfig(model=tiny_model, dtype=Dtype.FLOAT32, port=0, node_id="ol-2", memory_bytes=1 << 30)
        late = Node(config, open_model(tiny_model))
        late_stop, release = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(late.run(stop=late_stop, handle_signals=False))
            try:
                await late.wait_listening(timeout=DEADLINE_S)
                host = late.stage_host
                load = host.apply

                async def held_load(epoch: int, stages: tuple[StageRange, ...]) -> float:
                    async with asyncio.timeout(DEADLINE_S):
                        await release.wait()
                    return await load(epoch, stages)

                host.apply = held_load  # type: ignore[method-assign]  # the joining node loads when told to
                late.peers.dial("127.0.0.1", first_port)

                def moved_on(node: Node) -> bool:
                    current = node.stage_host.current
                    return current is not None and current[0] > old.epoch

                # Both old stages load the three-stage plan, stopping the committed plan's stages.
                await eventually(
                    "the old stages load the new plan", lambda: all(moved_on(n) for n in nodes), DEADLINE_S
                )
                active = nodes[0].coordinator.active
                assert active is not None and active.epoch == old.epoch, "the new plan is not committed yet"

                owner = nodes[0].owner
                result = GenerationResult(prompt_tokens=len(PROMPT))

                async def run() -> None:
                    job = GenerationJob(PROMPT, SamplingParams(), MAX_TOKENS)
                    async with aclosing(owner.stream(job)) as deltas:
                        async for delta in deltas:
                            result.add(delta)

                request = tg.create_task(run())
                replaced = FailureKind.PLAN_REPLACED.value
                await eventually(
                    "the stages refuse the request's open on the old plan",
                    lambda: owner.recovery.statistics().events.get(replaced, 0) >= 1 or request.done(),
                    DEADLINE_S,
                )
                assert not request.done(), "the request ended instead of waiting for the new plan"
                release.set()
                async with asyncio.timeout(DEADLINE_S):
                    await request
                final = nodes[0].coordinator.active
            finally:
                release.set()
                late_stop.set()
        assert final is not None and len(final.stages) == 3 and final.epoch > old.epoch
        assert result.token_ids == expected, "the answer equals the single-device run"
        events = owner.recovery.statistics().events
        assert set(events) == {replaced}, events  # refused on the old plan, then nothing else went wrong
        assert owner.stats.recoveries == events[replaced]
