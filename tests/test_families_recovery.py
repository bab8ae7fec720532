"""Exact replay on real (in-process) nodes for a family other than llama: gemma3_text, whose sliding-window
caches rotate within the answer (every split of every family is proved in test_families.py). Three nodes
serve it; one stage's node leaves after a few tokens; the survivors replay the request exactly, and the whole
answer must be the single device's, greedy and seeded."""

from __future__ import annotations

from pathlib import Path

import family_models as fm
import pytest
from test_recovery_modes import PROMPT, ROOMY, members, reference, run_and_stop

from exo_stable.engine.sampling import SamplingParams
from exo_stable.pipeline.recovery import ReplayMode
from exo_stable.pipeline.service import GenerationJob

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

MAX_TOKENS = 16


@pytest.mark.parametrize("family", ["gemma3_text"])
async def test_exact_replay_after_the_last_stage_leaves(family: str, default_gguf: Path, tmp_path: Path) -> None:
    model = fm.write(family, tmp_path / family, default_gguf)
    for params, victim in ((SamplingParams(), 2), (SamplingParams(temperature=0.9, top_p=0.95, seed=3), 1)):
        expected = await reference(model, params, MAX_TOKENS)
        assert len(set(expected)) > 3, expected
        async with members(model, f"fr{victim}") as m:
            for _ in range(3):
                await m.start(ROOMY)
            await m.wait_stages(3)
            job = GenerationJob(PROMPT, params, MAX_TOKENS, replay=ReplayMode.EXACT)
            result, _, before = await run_and_stop(m.nodes[0], m.stops[victim], job, after=6)
            assert before >= 6
            assert result.token_ids == expected, f"{family}: node {victim} left after {before} tokens"
