"""A one-stage plan decoding greedily one step ahead (StageCompute.pick_ahead): the same tokens as one
synchronous step at a time, whatever the next call brings."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.stagecompute import StageCompute, prompt_chunks
from exo_stable.engine.synthetic import tiny_gguf

N_LAYERS = 4
PROMPT = [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198]
STEPS = 10


@pytest.fixture(scope="module")
def compute(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> StageCompute:
    model = tiny_gguf(tmp_path_factory.mktemp("ahead") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=3)
    sc = StageCompute(open_model(model), LayerRange(0, N_LAYERS, N_LAYERS), Dtype.FLOAT32)
    sc.load()
    return sc


def synchronous(sc: StageCompute, rid: str, feed: list[int] | None = None) -> list[int]:
    """Greedy tokens one synchronous step at a time; ``feed[i]``, when given, is the token fed at step i + 1."""
    sc.open(rid, SamplingParams())
    out = [sc.prefill_local(rid, PROMPT)]
    for i in range(STEPS):
        given = out[-1] if feed is None else feed[i]
        out.append(sc.decode_local(rid, given, i + 1))
    sc.close(rid)
    return out


def ahead(sc: StageCompute, rid: str, feed: list[int] | None = None, *, last: int = STEPS) -> list[int]:
    """The same through pick_ahead, as a one-stage plan's stage calls it (the prompt's last chunk included)."""
    sc.open(rid, SamplingParams())
    *head, tail = prompt_chunks(PROMPT)
    for chunk in head:
        sc.forward(rid, mx.array([chunk], dtype=mx.int32))
    out = [sc.pick_ahead(rid, tail, queue_next=True)]
    for i in range(STEPS):
        given = out[-1] if feed is None else feed[i]
        out.append(sc.pick_ahead(rid, [given], queue_next=i + 1 < last))
    request = sc.requests[rid]
    assert request.tokens_in == len(PROMPT) + STEPS + (request.queued is not None)
    sc.close(rid)
    return out


def test_decoding_ahead_gives_the_synchronous_tokens(compute: StageCompute) -> None:
    expected = synchronous(compute, "sync")
    assert len(set(expected)) > 2, "the reference should not be degenerate"
    before = compute.stats.steps_ahead
    assert ahead(compute, "ahead") == expected
    assert compute.stats.steps_ahead - before == STEPS, "every decode step was already queued when asked for"
    assert ahead(compute, "ahead-short", last=STEPS - 1) == expected, "the last step queues nothing after it"


def test_a_different_token_undoes_the_queued_step(compute: StageCompute) -> None:
    # A replay feeds the tokens its client already has: at step 4 one other than the pick the queued step
    # consumed, so that step is undone and the fed token's step computed instead.
    base = synchronous(compute, "base")
    feed = [*base[:3], (base[3] + 1) % 1000, *base[4:STEPS]]
    expected = synchronous(compute, "sync-fed", feed)
    assert expected != base
    undone, used = compute.stats.steps_undone, compute.stats.steps_ahead
    got = ahead(compute, "ahead-fed", feed)
    assert got == expected
    # Call i feeds feed[i]; the step queued before it consumed the pick got[i]: undone wherever they differ.
    differ = sum(feed[i] != got[i] for i in range(STEPS))
    assert differ >= 1 and compute.stats.steps_undone - undone == differ
    assert compute.stats.steps_ahead - used == STEPS - differ


def test_only_greedy_requests_decode_ahead(compute: StageCompute) -> None:
    compute.open("sampled", SamplingParams(temperature=0.8, seed=1))
    try:
        with pytest.raises(ValueError, match="greedy"):
            compute.pick_ahead("sampled", PROMPT, queue_next=True)
    finally:
        compute.close("sampled")
