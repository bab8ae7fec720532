"""Each validation level catches what it claims, on real nodes (two in-process nodes over sockets, a tiny
random llama): inject the fault a level is for, inside a stage where no frame or chunk checksum can see it;
the lower level misses it (the answer differs from the single device's and no counter moved), the higher
one catches it (counted, recovered: the answer equals the single device's). Adaptive strictness moves a
real node's requests up after a detected corruption and back down after a clean window."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.node.node import Node
from exo_stable.pipeline.levels import AdaptiveConfig, AdaptiveStrictness, ValidationLevel
from exo_stable.pipeline.service import GenerationJob, GenerationResult
from exo_stable.pipeline.stage import StageActor
from exo_stable.pipeline.stagefaults import StageFaultConfig, StageFaults
from exo_stable.verify.run import InProcessCluster, in_process_cluster

pytestmark = pytest.mark.asyncio(loop_scope="module")

OFF, LIGHT, STRICT = ValidationLevel.OFF, ValidationLevel.LIGHT, ValidationLevel.STRICT
PROMPT = [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198]
MAX_TOKENS = 10
GREEDY = SamplingParams()


@dataclass
class Setup:
    cluster: InProcessCluster
    reference: list[int]

    @property
    def owner_node(self) -> Node:
        return self.cluster.nodes[0]

    def stage(self, index: int) -> StageActor:
        for node in self.cluster.nodes:
            actor = node.stage_host.actor
            if actor is not None and actor.config.index == index:
                return actor
        raise AssertionError(f"no stage {index}")

    def inject(self, index: int, config: StageFaultConfig) -> StageFaults:
        actor = self.stage(index)
        actor.integrity_faults = StageFaults(config, stage=index)
        return actor.integrity_faults

    def clear_faults(self) -> None:
        for index in (0, 1):
            self.inject(index, StageFaultConfig())

    async def run(self, level: ValidationLevel | None) -> list[int]:
        result = GenerationResult(prompt_tokens=len(PROMPT))
        job = GenerationJob(PROMPT, GREEDY, MAX_TOKENS, validation=level)
        async with aclosing(self.owner_node.owner.stream(job)) as deltas:
            async for delta in deltas:
                result.add(delta)
        return result.token_ids


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("levels") / "tiny.gguf", default_gguf, layers=4, seed=5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(tiny_model: Path) -> AsyncIterator[Setup]:
    engine = SingleDeviceEngine(open_model(tiny_model), dtype=Dtype.FLOAT32)
    await engine.start()
    try:
        reference = [t async for t in engine.generate(PROMPT, GREEDY, MAX_TOKENS)]
    finally:
        engine.close()
    assert len(set(reference)) > 2, "the reference should not be degenerate"
    async with in_process_cluster(tiny_model, Dtype.FLOAT32, (2, 2), name="levels") as cluster:
        for node in cluster.nodes:  # the level tests must run at the level they ask for
            node.owner.adaptive = AdaptiveStrictness(LIGHT, AdaptiveConfig(enabled=False), clock=lambda: 0.0)
        yield Setup(cluster, reference)


@pytest.fixture
def fresh(setup: Setup) -> Setup:
    setup.clear_faults()
    return setup


@contextmanager
def spot_fraction(node: Node, fraction: float) -> Iterator[None]:
    owner = node.owner
    saved = owner.config
    owner.config = dataclasses.replace(saved, spot_check_fraction=fraction)
    try:
        yield
    finally:
        owner.config = saved


def counters(setup: Setup) -> dict[str, Any]:
    s0, s1, owner = setup.stage(0).stats, setup.stage(1).stats, setup.owner_node.owner
    return {
        "bad_activations": s0.bad_activations + s1.bad_activations,
        "source_checksum_failures": s0.source_checksum_failures + s1.source_checksum_failures,
        "spot_checks": s0.spot_checks + s1.spot_checks,
        "spot_check_mismatches": s0.spot_check_mismatches + s1.spot_check_mismatches,
        "token_checksum_failures": owner.validation.token_checksum_failures,
        "recoveries": owner.stats.recoveries,
    }


def moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


async def test_every_level_equals_the_single_device_without_faults(fresh: Setup) -> None:
    """No false positives: strict with every step recomputed finds the recomputation bit-identical."""
    stage0 = fresh.stage(0)
    with spot_fraction(fresh.owner_node, 1.0):
        for level in (OFF, LIGHT, STRICT):
            before = counters(fresh)
            assert await fresh.run(level) == fresh.reference, level
            change = moved(before, counters(fresh))
            if level is STRICT:
                assert change == {"spot_checks": 2 * MAX_TOKENS}, change  # every step on both stages
            else:
                assert change == {}, (level, change)
    assert stage0.stats.spot_check_mismatches == 0


async def test_token_corrupted_after_sealing_light_catches_off_misses(fresh: Setup) -> None:
    """A token altered after the last stage sealed it (the frame CRC is computed over the altered token)."""
    faults = fresh.inject(1, StageFaultConfig(token=1.0, skip=3, limit=1))
    before = counters(fresh)
    ids = await fresh.run(OFF)
    assert faults.counts.token == 1
    assert ids != fresh.reference and ids[3] == fresh.reference[3] ^ 1 and ids[4:] == fresh.reference[4:]
    assert moved(before, counters(fresh)) == {}, "off must not notice"

    faults = fresh.inject(1, StageFaultConfig(token=1.0, skip=3, limit=1))
    before = counters(fresh)
    assert await fresh.run(LIGHT) == fresh.reference
    assert faults.counts.token == 1
    assert moved(before, counters(fresh)) == {"token_checksum_failures": 1}  # asked again, no recovery needed


async def test_activation_corrupted_in_sender_memory_strict_catches_light_misses(fresh: Setup) -> None:
    """Hidden states altered in stage 0's memory after they left the layers, before framing: every chunk and
    frame CRC is computed over the altered bytes, so light sees nothing; strict's source checksum does."""
    faults = fresh.inject(0, StageFaultConfig(act_memory=1.0, skip=3, limit=1))
    before = counters(fresh)
    ids = await fresh.run(LIGHT)
    assert faults.counts.act_memory == 1
    assert ids != fresh.reference and ids[:3] == fresh.reference[:3]
    assert moved(before, counters(fresh)) == {}, "light must not notice"

    faults = fresh.inject(0, StageFaultConfig(act_memory=1.0, skip=3, limit=1))
    with spot_fraction(fresh.owner_node, 0.0):  # the end-to-end checksum alone
        before = counters(fresh)
        assert await fresh.run(STRICT) == fresh.reference
    assert faults.counts.act_memory == 1
    assert moved(before, counters(fresh)) == {"bad_activations": 1, "source_checksum_failures": 1, "recoveries": 1}


async def test_transient_compute_fault_strict_spot_check_catches_light_misses(fresh: Setup) -> None:
    """Stage 0's compute gets one step wrong (before any checksum is taken, so no checksum can tell): light
    misses it; strict's spot check recomputes the step, sees two different results, fails the step, and the
    owner's replay regenerates the token."""
    faults = fresh.inject(0, StageFaultConfig(act_compute=1.0, skip=4, limit=1))
    before = counters(fresh)
    ids = await fresh.run(LIGHT)
    assert faults.counts.act_compute == 1
    assert ids != fresh.reference and ids[:4] == fresh.reference[:4]
    assert moved(before, counters(fresh)) == {}

    faults = fresh.inject(0, StageFaultConfig(act_compute=1.0, skip=4, limit=1))
    owner = fresh.owner_node.owner
    with spot_fraction(fresh.owner_node, 1.0):
        before = counters(fresh)
        assert await fresh.run(STRICT) == fresh.reference
    change = moved(before, counters(fresh))
    assert change["spot_check_mismatches"] == 1 and change["recoveries"] == 1, change
    assert owner.recovery.stats.events["spot_check"] >= 1


async def test_adaptive_strictness_moves_both_ways_on_a_node(fresh: Setup) -> None:
    owner = fresh.owner_node.owner
    clock = [100.0]
    saved = owner.adaptive
    owner.adaptive = AdaptiveStrictness(LIGHT, AdaptiveConfig(clean_window_s=60.0), clock=lambda: clock[0])
    try:
        by_level = dict(owner.validation.requests)
        assert await fresh.run(None) == fresh.reference  # clean: the node's level
        assert owner.validation.requests[LIGHT.value] == by_level[LIGHT.value] + 1
        fresh.inject(1, StageFaultConfig(token=1.0, skip=2, limit=1))
        assert await fresh.run(None) == fresh.reference  # light catches the corrupted token
        clock[0] += 1.0
        assert await fresh.run(None) == fresh.reference  # the next request runs strict
        assert owner.validation.requests[STRICT.value] == by_level[STRICT.value] + 1
        assert owner.adaptive.snapshot()["floor"] == "strict"
        health = await http_health(fresh.owner_node)
        assert health["owner"]["validation"]["adaptive"]["effective"] == "strict"
        clock[0] += 61.0
        assert await fresh.run(None) == fresh.reference  # after a clean window: back to light
        assert owner.validation.requests[LIGHT.value] == by_level[LIGHT.value] + 3
        assert owner.adaptive.snapshot()["floor"] == "off" and owner.adaptive.lowers == 1
    finally:
        owner.adaptive = saved


async def http_health(node: Node) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(f"http://127.0.0.1:{node.port}/health") as resp,
    ):
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def test_per_request_level_through_the_api(fresh: Setup) -> None:
    node = fresh.owner_node
    url = f"http://127.0.0.1:{node.port}/v1/completions"
    before = dict(node.owner.validation.requests)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "exo_validation": "strict"}
        async with session.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
        async with session.post(url, json={**body, "exo_validation": "paranoid"}) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["param"] == "exo_validation" and error["type"] == "invalid_request_error"
    assert node.owner.validation.requests[STRICT.value] == before[STRICT.value] + 1
