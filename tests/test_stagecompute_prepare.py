"""Decode steps built ahead (StageCompute.prepare): a stage builds a step's graph before its input comes and
fills the input in when it does. The results must be the bytes of the ordinary path, on every stage of a
split, whatever the next call brings."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.stagecompute import StageCompute, UnknownRequest, prompt_chunks
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.engine.wire import tensor_to_bytes

N_LAYERS = 4
BOUNDS = [(0, 2), (2, 3), (3, 4)]  # first, middle and last stage
PROMPT = [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198]
STEPS = 8
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=11)


@pytest.fixture(scope="module", params=[Dtype.BFLOAT16, Dtype.FLOAT32])
def stages(
    request: pytest.FixtureRequest, default_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[StageCompute]:
    model = tiny_gguf(tmp_path_factory.mktemp("prepare") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=5)
    source = open_model(model)
    out = []
    for start, end in BOUNDS:
        sc = StageCompute(source, LayerRange(start, end, N_LAYERS), request.param)
        sc.load()
        out.append(sc)
    return out


def step(stages: list[StageCompute], rid: str, tokens: list[int], position: int) -> tuple[int, list[bytes]]:
    """One step through every stage as the stage actors run it (exact bytes between stages); the picked token
    and the bytes each stage but the last sent on."""
    sent: list[bytes] = []
    wire = None
    for sc in stages:
        out = sc.forward_input(rid, tokens, wire)
        if sc.layers.is_last:
            return sc.pick(rid, out, position), sent
        wire = tensor_to_bytes(out)
        sent.append(wire[2])
    raise AssertionError("no last stage")


def generate(
    stages: list[StageCompute],
    rid: str,
    params: SamplingParams,
    *,
    prepare: bool,
    feed: dict[int, list[int]] | None = None,
) -> tuple[list[int], list[list[bytes]]]:
    """The prompt, then STEPS decode steps; with ``prepare`` every stage builds its next step as soon as its
    output is sent on. ``feed[i]``: the input of decode step i instead of the last token (a replay's)."""
    for sc in stages:
        sc.open(rid, params)
    tokens: list[int] = []
    sent: list[list[bytes]] = []
    *head, tail = prompt_chunks(PROMPT)
    for chunk in head:
        step(stages, rid, chunk, 0)
    token, out = step(stages, rid, tail, 0)
    tokens.append(token)
    sent.append(out)
    for i in range(STEPS):
        if prepare:
            for sc in stages:
                assert sc.prepare(rid)
        given = (feed or {}).get(i, [tokens[-1]])
        token, out = step(stages, rid, given, i + 1)
        tokens.append(token)
        sent.append(out)
    for sc in stages:
        request = sc.requests[rid]
        assert request.prepared is None
        assert request.tokens_in == len(PROMPT) + sum(len((feed or {}).get(i, [0])) for i in range(STEPS))
        assert all(c.offset == request.tokens_in for c in request.cache)
        sc.close(rid)
    return tokens, sent


@pytest.mark.parametrize("params", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_prepared_steps_give_the_ordinary_bytes(stages: list[StageCompute], params: SamplingParams) -> None:
    expected, expected_sent = generate(stages, "plain", params, prepare=False)
    assert len(set(expected)) > 2, "the reference should not be degenerate"
    used = [sc.stats.prepared_used for sc in stages]
    got, got_sent = generate(stages, "prepared", params, prepare=True)
    assert got == expected
    assert got_sent == expected_sent  # every stage's hidden states, bit for bit
    assert [sc.stats.prepared_used - u for sc, u in zip(stages, used, strict=True)] == [STEPS] * len(stages)


def test_a_step_of_another_shape_undoes_the_prepared_one(stages: list[StageCompute]) -> None:
    # A replay can bring several tokens at once where one was expected: the prepared step is trimmed off the
    # caches and the input takes the ordinary path, with the same result as when nothing was prepared.
    feed = {2: [563, 260], 5: [30, 2, 198]}
    expected, expected_sent = generate(stages, "plain", SamplingParams(), prepare=False, feed=feed)
    undone = [sc.stats.prepared_undone for sc in stages]
    got, got_sent = generate(stages, "prepared", SamplingParams(), prepare=True, feed=feed)
    assert (got, got_sent) == (expected, expected_sent)
    assert [sc.stats.prepared_undone - u for sc, u in zip(stages, undone, strict=True)] == [len(feed)] * len(stages)


def test_rewind_and_forward_undo_a_prepared_step(stages: list[StageCompute]) -> None:
    first = stages[0]
    first.open("r", SamplingParams())
    first.forward_input("r", PROMPT)
    assert first.prepare("r")
    assert not first.prepare("r"), "one step at a time"
    offset = first.requests["r"].cache[0].offset
    assert offset == len(PROMPT) + 1  # the prepared step's cache entry is written (lazily)
    first.rewind("r", 1)  # the prepared step goes first, then the prompt's last position
    assert first.requests["r"].cache[0].offset == len(PROMPT) - 1
    assert first.requests["r"].prepared is None
    again = first.forward(
        "r",
        mx.array([[PROMPT[-1]]], dtype=mx.int32),
    )
    assert first.requests["r"].cache[0].offset == len(PROMPT)
    mx.eval(again)
    first.close("r")
    with pytest.raises(UnknownRequest):
        first.prepare("r")
