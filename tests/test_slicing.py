"""A prompt chunk evaluated a few layers at a time gives the bits of one forward call, on every stage.

StageCompute.begin builds a chunk's graph and SlicedForward.advance evaluates it slice by slice (what a
batching step does with a chunk while other requests decode); the result, and the cache the next step reads,
must be those of StageCompute.forward, whatever the slices. SliceClock's choice of a slice is pure
arithmetic, checked here on its own."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from exo_stable.engine.batching import BatchMode
from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.slicing import SliceClock
from exo_stable.engine.stagecompute import StageCompute
from exo_stable.engine.synthetic import tiny_gguf

N_LAYERS = 6


@pytest.fixture(scope="module")
def tiny(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("slicing") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=9)


def _x(first: bool, length: int, dtype: Dtype, rng: np.random.Generator) -> mx.array:
    if first:
        return mx.array([[int(t) for t in rng.integers(0, 49152, size=length)]], dtype=mx.int32)
    act = mx.float32 if dtype is Dtype.FLOAT32 else mx.bfloat16
    return mx.array(rng.standard_normal((1, length, 64)).astype(np.float32)).astype(act)


@pytest.mark.parametrize("dtype", [Dtype.FLOAT32, Dtype.BFLOAT16])
@pytest.mark.parametrize("bounds", [(0, 6), (0, 4), (2, 6)])
@pytest.mark.parametrize("step", [1, 2, 5, 6])
def test_a_sliced_chunk_equals_one_forward_call(tiny: Path, dtype: Dtype, bounds: tuple[int, int], step: int) -> None:
    source = open_model(tiny)
    whole = StageCompute(source, LayerRange(*bounds, N_LAYERS), dtype, batch=BatchMode.OFF)
    sliced = StageCompute(source, LayerRange(*bounds, N_LAYERS), dtype, batch=BatchMode.OFF)
    whole.load()
    sliced.load()
    rng = np.random.default_rng(step)
    first = bounds[0] == 0
    chunks = [_x(first, n, dtype, rng) for n in (37, 64, 11)]
    decode = _x(first, 1, dtype, rng)
    for sc in (whole, sliced):
        sc.open("r", SamplingParams())
    expected = [whole.forward("r", x) for x in chunks] + [whole.forward("r", decode)]
    got = []
    for i, x in enumerate(chunks):
        call = sliced.begin("r", x)
        advances = 0
        while not call.advance(step):
            advances += 1
            assert call.stepped == step
        assert advances == -(-(bounds[1] - bounds[0]) // step) - 1
        assert call.result is not None
        got.append(call.result)
        assert sliced.requests["r"].tokens_in == sum(int(c.shape[1]) for c in chunks[: i + 1])
    got.append(sliced.forward("r", decode))  # reads the cache the sliced calls wrote
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert mx.array_equal(a, b).item(), "a sliced call differs from one forward call"


def test_a_chunk_without_logits_writes_the_same_cache(tiny: Path) -> None:
    """A prompt chunk before the last, on the last stage: only its cache entries are computed (no head)."""
    source = open_model(tiny)
    whole = StageCompute(source, LayerRange(0, N_LAYERS, N_LAYERS), Dtype.FLOAT32, batch=BatchMode.OFF)
    sliced = StageCompute(source, LayerRange(0, N_LAYERS, N_LAYERS), Dtype.FLOAT32, batch=BatchMode.OFF)
    whole.load()
    sliced.load()
    rng = np.random.default_rng(3)
    chunk, last = _x(True, 50, Dtype.FLOAT32, rng), _x(True, 20, Dtype.FLOAT32, rng)
    for sc in (whole, sliced):
        sc.open("r", SamplingParams())
    whole.forward("r", chunk)
    expected = whole.forward("r", last)
    call = sliced.begin("r", chunk, logits=False)
    while not call.advance(4):
        pass
    assert call.result is None
    assert mx.array_equal(expected, sliced.forward("r", last)).item()


def test_the_clock_gives_a_step_about_a_decode_step_of_prompt_layers() -> None:
    clock = SliceClock(share=1.0)
    assert clock.budget(decoding=False) is None  # nobody decodes beside the chunks: they go whole
    assert clock.layers(30, 128, None) == 30
    assert clock.budget(decoding=True) == 0.0  # decode rows not measured yet
    assert clock.layers(30, 128, 0.0) == 1  # nothing measured yet: one layer, to measure
    clock.decoded(0.1)
    clock.sliced(1, 100, 0.04)
    within = clock.budget(decoding=True)
    assert within == pytest.approx(0.1)
    assert clock.layers(30, 100, within) == 2  # 0.1 s of decode: two layers of 0.04 s
    assert clock.layers(30, 50, within) == 5  # a chunk half as wide: a layer takes half as long
    assert clock.layers(30, 100, 0.01) == 1  # at least one layer
    assert clock.layers(1, 100, within) == 1  # never more than is left
    clock.sliced(2, 100, 0.4)  # a slow slice (0.2 s a layer) moves the average, not all the way
    assert clock.layer_s == pytest.approx((0.7 * 0.04 + 0.3 * 0.2) / 100)
    assert clock.layers(30, 100, within) == 1
    fast = SliceClock(share=2.0)
    fast.decoded(0.1)
    fast.sliced(5, 10, 0.05)
    assert fast.layers(30, 10, fast.budget(decoding=True)) == 20
    assert SliceClock(share=None).budget(decoding=True) is None  # slicing off: chunks go whole
