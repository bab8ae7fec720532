"""The mask of a batched step over slots (``--batch fast``): built once per step as an additive mask in the
queries' dtype, it gives exactly the attention a boolean mask gives (MLX's GPU kernels take additive masks
only, so a boolean one was converted again at every layer), and each row reads only its own positions."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from exo_stable.engine.slots import SlotArena, SlotCache, SlotRows, StepIndex

HEADS, KV_HEADS, DIM = 4, 2, 16
OFFSETS = [5, 0, 11]  # positions each row already holds; the step writes one more


def _rows(dtype: mx.Dtype, rng: np.random.Generator) -> tuple[SlotRows, mx.array, StepIndex]:
    arena = SlotArena(layers=1, slots=len(OFFSETS))
    caches = []
    for slot, offset in enumerate(OFFSETS):
        cache = SlotCache(arena, 0, slot)
        if offset:
            keys = mx.array(rng.standard_normal((1, KV_HEADS, offset, DIM)).astype(np.float32)).astype(dtype)
            values = mx.array(rng.standard_normal((1, KV_HEADS, offset, DIM)).astype(np.float32)).astype(dtype)
            cache.update_and_fetch(keys, values)
        caches.append(cache)
    index = StepIndex()
    rows = SlotRows(caches, index)
    shape = (len(OFFSETS), KV_HEADS, 1, DIM)
    keys = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    values = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    rows.update(keys, values)
    queries = mx.array(rng.standard_normal((len(OFFSETS), HEADS, 1, DIM)).astype(np.float32)).astype(dtype)
    return rows, queries, index


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_additive_mask_attends_as_the_boolean_mask_and_each_row_reads_its_own(dtype: mx.Dtype) -> None:
    rng = np.random.default_rng(3)
    rows, queries, index = _rows(dtype, rng)
    arena = rows.arena
    k, v = arena.keys[0], arena.values[0]
    assert k is not None and v is not None
    longest = max(OFFSETS) + 1
    keys, values = k[:, :, :longest, :], v[:, :, :longest, :]

    out = rows.attend(queries, scale=0.25)
    mask = index.get(f"mask{queries.dtype}", lambda: pytest.fail("attend built no mask for the step"))
    assert mask.dtype == dtype and mask.shape == (len(OFFSETS), 1, 1, longest)
    reads = np.arange(longest)[None, :] < (np.array(OFFSETS) + 1)[:, None]
    assert np.array_equal(np.array(mask.astype(mx.float32)).reshape(len(OFFSETS), longest) == 0, reads)

    boolean = mx.array(reads.reshape(len(OFFSETS), 1, 1, longest))
    with_bool = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=0.25, mask=boolean)
    assert mx.array_equal(out, with_bool), "the additive mask changed a bit of the attention"

    for i, offset in enumerate(OFFSETS):  # each row: its own positions only, as a lone call over its cache
        own = mx.fast.scaled_dot_product_attention(
            queries[i : i + 1], keys[i : i + 1, :, : offset + 1], values[i : i + 1, :, : offset + 1], scale=0.25
        )
        tolerance = 1e-5 if dtype == mx.float32 else 1e-2
        assert mx.allclose(out[i : i + 1], own, atol=tolerance, rtol=tolerance)


def test_the_mask_is_built_once_per_step_and_the_offsets_too() -> None:
    from exo_stable.engine.batching import RowsCache

    rng = np.random.default_rng(4)
    rows, queries, index = _rows(mx.float32, rng)
    first = index.get(f"mask{queries.dtype}", lambda: rows._mask(queries.dtype))
    again = index.get(f"mask{queries.dtype}", lambda: pytest.fail("the step's mask was built twice"))
    assert first is again
    caches = rows.caches
    views = [RowsCache(caches, index) for _ in range(3)]  # three layers of one step
    assert isinstance(views[0].offset, mx.array)
    assert all(view.offset is views[0].offset for view in views)
