"""A node's next shard takes over the layers its current shard built: the result is the shard a fresh load
builds, parameter for parameter and bit for bit, and the tensors of the kept layers are not read again."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from exo_stable.engine.loader import ModelSource, open_model
from exo_stable.engine.model import LayerRange, ShardModel
from exo_stable.engine.modelspec import Dtype


def _params(model: ShardModel) -> dict[str, mx.array]:
    return {str(k): v for k, v in tree_flatten(model.parameters())}


def _same(a: ShardModel, b: ShardModel) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name, value in pa.items():
        other = pb[name]
        assert (value.dtype, value.shape) == (other.dtype, other.shape), name
        assert mx.array_equal(value, other).item(), name


def _reads(source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tensor names the source reads from now on."""
    seen: list[str] = []
    read = source.read_tensors

    def spy(names: list[str]) -> dict[str, mx.array]:
        seen.extend(names)
        return read(names)

    monkeypatch.setattr(source, "read_tensors", spy)
    return seen


# (old range, new range) of a 30-layer model: grow at the end (taking the tied head), grow at the start
# (taking the embedding), shrink (nothing to read), and a disjoint range (only the embedding is kept).
MOVES = [((10, 20), (10, 30)), ((10, 20), (0, 20)), ((0, 15), (0, 10)), ((0, 10), (20, 30))]


@pytest.mark.parametrize(("old", "new"), MOVES)
def test_kept_layers_build_the_fresh_shard(
    default_gguf: Path, old: tuple[int, int], new: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = open_model(default_gguf)
    n = source.spec.num_hidden_layers
    before = source.load_shard(LayerRange(*old, n), Dtype.FLOAT32)
    fresh = source.load_shard(LayerRange(*new, n), Dtype.FLOAT32)
    reads = _reads(source, monkeypatch)
    kept = source.load_shard(LayerRange(*new, n), Dtype.FLOAT32, keep=before)
    _same(fresh, kept)
    common = set(range(max(old[0], new[0]), min(old[1], new[1])))
    read_layers = {int(name.split(".")[2]) for name in reads if name.startswith("model.layers.")}
    assert read_layers == set(range(*new)) - common
    # The embedding (stage 0's input, and the tied head of the last stage) is read only when the old
    # shard did not hold it.
    held = old[0] == 0 or old[1] == n
    needed = new[0] == 0 or new[1] == n
    assert any(name.startswith("model.embed_tokens.") for name in reads) == (needed and not held)
    # The kept shard answers as the fresh one does.
    x = mx.array([[1, 2, 3]], dtype=mx.int32) if new[0] == 0 else mx.ones((1, 3, source.spec.hidden_size))
    assert mx.array_equal(fresh(x, fresh.make_cache()), kept(x, kept.make_cache())).item()


@pytest.mark.parametrize("dtype", [Dtype.QUANTIZED, Dtype.BFLOAT16])
def test_kept_layers_of_a_random_model(dtype: Dtype) -> None:
    source = open_model("random:tiny")
    n = source.spec.num_hidden_layers
    before = source.load_shard(LayerRange(0, n // 2, n), dtype)
    _same(
        source.load_shard(LayerRange(0, n - 1, n), dtype),
        source.load_shard(LayerRange(0, n - 1, n), dtype, keep=before),
    )
