"""Sampling is a pure function of logits, parameters, seed and position."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.engine.sampling import PENALTY_WINDOW, SamplingParams, pick, process, sample
from exo_stable.pipeline.sampling import params_from_wire, params_to_wire
from exo_stable.wire.messages import SamplingSpec

logits_strategy = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=64).map(
    lambda xs: np.array(xs, dtype=np.float32)
)


@given(logits_strategy)
def test_greedy_is_argmax(logits: np.ndarray) -> None:
    assert sample(logits, SamplingParams(), 0) == int(np.argmax(logits))


@given(logits_strategy, st.integers(0, 2**63), st.integers(0, 10_000))
def test_same_seed_and_position_same_token(logits: np.ndarray, seed: int, position: int) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=10, seed=seed)
    assert sample(logits, params, position) == sample(logits.copy(), params, position)


@settings(max_examples=50)
@given(logits_strategy, st.integers(1, 5), st.integers(0, 2**32))
def test_top_k_only_picks_among_the_k_best(logits: np.ndarray, k: int, seed: int) -> None:
    params = SamplingParams(temperature=1.5, top_k=k, seed=seed)
    token = sample(logits, params, 3)
    kth_best = np.sort(logits)[::-1][min(k, len(logits)) - 1]
    assert logits[token] >= kth_best


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05], dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_p=0.8)
    picked = {sample(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=s), 0) for s in range(200)}
    assert picked == {0, 1}
    assert params.top_p == 0.8


def test_distribution_follows_the_probabilities() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    counts = np.bincount(
        [sample(logits, SamplingParams(temperature=1.0, seed=7), pos) for pos in range(3000)], minlength=3
    )
    freq = counts / counts.sum()
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.04)


def test_positions_draw_independently() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    tokens = {sample(logits, SamplingParams(temperature=1.0, seed=1), pos) for pos in range(50)}
    assert len(tokens) > 40


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -0.1}, {"temperature": 11.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}]
)
def test_invalid_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_penalties_follow_llamacpp() -> None:
    """Repetition divides positive logits and multiplies negative ones; then frequency (per occurrence) and
    presence (once) subtract; over the prompt's tail and the completion's tokens together."""
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, prompt_tail=(1,))
    out = process(logits, params, [0, 0])
    assert out.tolist() == [2.0 / 2 - 2 * 0.5 - 0.25, -1.0 * 2 - 0.5 - 0.25, 0.5, 3.0]
    assert sample(logits, params, 0, [3]) == 0, "greedy is the argmax after the penalties"


def test_penalties_look_back_over_a_window_only() -> None:
    logits = np.array([1.0, 0.0], dtype=np.float32)
    params = SamplingParams(presence_penalty=2.0)
    assert process(logits, params, [0])[0] == -1.0
    assert process(logits, params, [0] + [1] * PENALTY_WINDOW)[0] == 1.0


def test_logit_bias_and_min_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    banned = SamplingParams(logit_bias=((0, -100.0),))
    assert sample(logits, banned, 0) == 1
    forced = SamplingParams(temperature=1.0, seed=3, logit_bias=((2, 100.0),))
    assert {sample(logits, forced, pos) for pos in range(50)} == {2}
    min_p = SamplingParams(temperature=1.0, min_p=0.5)  # keeps tokens at least half as likely as the best
    assert {sample(logits, SamplingParams(**{**msgspec.structs.asdict(min_p), "seed": s}), 0) for s in range(200)} == {
        0,
        1,
    }


def test_pick_reports_the_models_own_logprobs() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    picked = pick(logits, SamplingParams(logprobs=2, logit_bias=((2, 100.0),)), 0)
    assert picked.token == 2
    assert picked.logprob == pytest.approx(np.log(0.2), abs=1e-6), "before bias and penalties"
    assert [t for t, _ in picked.top] == [0, 1]
    assert pick(logits, SamplingParams(), 0).logprob is None


def test_a_tiny_temperature_samples_the_top_token_without_overflow() -> None:
    """Found by the API fuzz: 5e-324 overflowed the division (a RuntimeWarning, an error under pytest) and
    crashed the stage; three such requests made the node give up its stage."""
    logits = np.array([0.5, 3.0, -1.0, 2.9], dtype=np.float32)
    assert sample(logits, SamplingParams(temperature=5e-324, seed=1), 0) == 1


def test_the_wire_spec_carries_every_sampling_field_and_converts_both_ways() -> None:
    """The wire's SamplingSpec mirrors SamplingParams field for field (name, type, default): a field added to
    one and not the other would be lost between the owner and the last stage."""

    def shape(cls: type[msgspec.Struct]) -> list[tuple[str, object, object]]:
        return [(f.name, f.type, f.default) for f in msgspec.structs.fields(cls)]

    assert shape(SamplingSpec) == shape(SamplingParams)
    params = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=12345,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias=((3, 1.5),),
        prompt_tail=(1, 2, 3),
        logprobs=2,
        grammar="start: 'x'",
    )
    spec = params_to_wire(params)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=SamplingSpec) == spec
    assert params_from_wire(spec) == params
    with pytest.raises(ValueError, match="temperature"):
        params_from_wire(SamplingSpec(temperature=11.0))
