"""One forward call over several requests' decode steps, each row with its own KV cache.

Batching keeps this project's promise (a request's tokens do not depend on where, or beside whom, it ran)
only if every row of a batched step is bit for bit the row a lone step computes. The construction here
batches what is row-wise by nature and keeps apart what is not:

- The matrix products (projections, MLP, head), norms, RoPE and element-wise operations run once over all
  rows. Their rows equal the lone rows only where the backend's kernels are row-exact, which depends on the
  backend, the dtype and the matrices' shapes (benchmarks/batch_exactness.py): in ``exact`` mode a stage
  measures it on its own loaded matrices when it loads (:meth:`StageCompute.probe_rows`) and batches only up
  to the size found exact.
- Attention runs per row, on that request's own cache, with the very operations and shapes of a lone decode
  step (no padding, no mask): a row's attention cannot depend on its neighbours or on their lengths. Under
  ``--batch fast`` the rows' caches are slots of one buffer per layer (:mod:`exo_stable.engine.slots`) and
  attend in one masked call instead.

The family's own model code runs unchanged. Each layer gets a :class:`RowsCache`, a view over the layer's
caches of the batch's requests: RoPE reads its per-row offsets, its ``update_and_fetch`` writes each row's
keys and values into that row's own cache (as a lone step would), and the attention call reaches
:func:`_attend` through mlx-lm's quantized-cache hook (``cache.bits``), which computes each row alone.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models import base as _mlx_base
from mlx_lm.models.cache import KVCache

from exo_stable.engine.slots import SlotRows, StepIndex


class BatchMode(enum.Enum):
    """How a node batches decode steps (``--batch``)."""

    OFF = "off"  # one request per forward call, as before
    EXACT = "exact"  # batch only up to the size whose rows a probe at load found bit-exact
    FAST = "fast"  # batch on every backend up to the batch limit; rows may differ in the last bits


def exact_limit(probe: dict[int, bool]) -> int:
    """The largest batch size up to which every size was bit-exact in a probe (1: none was)."""
    limit = 1
    for size in sorted(probe):
        if not probe[size]:
            break
        limit = size
    return limit


Product = tuple[tuple[object, ...], int, Callable[[mx.array], mx.array]]
"""A matrix product of a model: its signature (kind, weight shape and dtype, quantization), input width, call."""


def distinct_products(net: nn.Module, *, head: bool) -> list[Product]:
    """The model's matrix products of distinct kinds and shapes (linear layers, and a tied head), each as
    its signature, its input width and the call. ``head``: the shard computes the logits (the last stage),
    so an embedding without an ``lm_head`` beside it is the tied head's product; elsewhere an embedding is
    only looked up."""
    seen: set[tuple[object, ...]] = set()
    out: list[Product] = []
    modules = dict(net.named_modules())
    tied_head = head and not any(name == "lm_head" or name.endswith(".lm_head") for name in modules)
    for _, module in modules.items():
        if isinstance(module, nn.QuantizedLinear | nn.Linear):
            width = module.weight.shape[1] * (32 // module.bits if isinstance(module, nn.QuantizedLinear) else 1)
            call: Callable[[mx.array], mx.array] = module
        elif tied_head and isinstance(module, nn.QuantizedEmbedding | nn.Embedding) and "weight" in module:
            width = module.weight.shape[1] * (32 // module.bits if isinstance(module, nn.QuantizedEmbedding) else 1)
            call = module.as_linear
        else:
            continue
        signature: tuple[object, ...] = (
            type(module).__name__,
            tuple(module.weight.shape),
            str(module.weight.dtype),
            getattr(module, "bits", None),
            getattr(module, "group_size", None),
        )
        if signature not in seen:
            seen.add(signature)
            out.append((signature, width, call))
    return out


_PROBED: dict[tuple[object, ...], dict[int, bool]] = {}
"""Which batch sizes each matrix product (by device, dtype and signature) gave every row its lone bits."""
_PROBED_LOCK = threading.Lock()


def probe_products(net: nn.Module, *, head: bool, dtype: mx.Dtype, most: int) -> dict[int, bool]:
    """For each batch size 2..``most``: does every distinct matrix product of ``net`` (see
    :func:`distinct_products`) give each row of a batch, in ``dtype``, the bits it gives that row alone?
    Each runs on random rows, alone and at every batch size; the answer depends on the backend, the dtype and
    the shapes, not on the values, so each product is probed once per process and device."""
    key = mx.random.key(7)
    found: dict[int, bool] = {size: True for size in range(2, most + 1)}
    device = str(mx.default_device())
    for signature, width, product in distinct_products(net, head=head):
        known = (device, str(dtype), *signature)
        with _PROBED_LOCK:
            sizes = _PROBED.get(known)
        if sizes is None or len(sizes) < most - 1:
            # A stage loaded again (a new plan, a failover's survivor) with products of the same shapes
            # reuses the answer instead of paying it again.
            key, sub = mx.random.split(key)
            x = mx.random.normal((most, 1, width), key=sub).astype(dtype)
            alone = [product(x[i : i + 1]) for i in range(most)]
            sizes = {}
            for size in range(2, most + 1):
                batched = product(x[:size])
                mx.eval(batched, alone[:size])
                sizes[size] = all(bool(mx.array_equal(batched[i : i + 1], alone[i])) for i in range(size))
            with _PROBED_LOCK:
                _PROBED[known] = sizes
        for size in range(2, most + 1):
            found[size] = found[size] and sizes[size]
    return found


class _Rows:
    """What :class:`RowsCache` hands mlx-lm's attention hook in place of a quantization width."""

    def __init__(self, view: RowsCache) -> None:
        self.view = view


class RowsCache:
    """One layer's view over the caches of a batch's requests (row ``i`` is ``caches[i]``)."""

    group_size = 0  # read by mlx-lm's hook alongside ``bits``; unused

    def __init__(self, caches: Sequence[KVCache], index: StepIndex | None = None) -> None:
        self.caches = list(caches)
        self.bits = _Rows(self)
        self._fetched: list[tuple[mx.array, mx.array]] = []
        # Rows whose caches are slots of one buffer (``--batch fast``) write and attend in one call each.
        index = index or StepIndex()
        self._shared = SlotRows(self.caches, index) if SlotRows.fits(self.caches) else None
        offsets = [int(c.offset) for c in self.caches]
        # One offset for all rows needs no array (and keeps RoPE on its scalar path); else the rows' offsets,
        # the same at every layer of the step, are one array the step's layers share.
        self.offset: int | mx.array = (
            offsets[0] if len(set(offsets)) == 1 else index.get("offsets", lambda: mx.array(offsets, dtype=mx.int32))
        )

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] != 1:
            raise ValueError("a batched forward call takes one position per request")
        if self._shared is not None:
            self._shared.update(keys, values)
            return keys, values
        self._fetched = [
            cache.update_and_fetch(keys[i : i + 1], values[i : i + 1]) for i, cache in enumerate(self.caches)
        ]
        return keys, values  # the family passes these to its attention call, which uses the rows' own instead

    def make_mask(self, n: int, window_size: int | None = None, return_array: bool = False) -> Any:
        if n != 1 or window_size is not None:
            raise ValueError("a batched forward call decodes one position per request over full-attention caches")
        return None  # a lone one-position step over a full-attention cache has no mask

    def attend(self, queries: mx.array, scale: float, mask: Any) -> mx.array:
        if self._shared is not None and mask is None:
            return self._shared.attend(queries, scale)
        if mask is not None or len(self._fetched) != queries.shape[0]:
            raise RuntimeError("batched attention without its rows' keys and values")
        rows = [
            mx.fast.scaled_dot_product_attention(queries[i : i + 1], k, v, scale=scale, mask=None)
            for i, (k, v) in enumerate(self._fetched)
        ]
        self._fetched = []
        return mx.concatenate(rows, axis=0)


class RowsGhost:
    """The cache of a layer outside the shard, for a batched call: offsets and masks as the shard's own."""

    def __init__(self, reference: RowsCache) -> None:
        self._reference = reference

    @property
    def offset(self) -> int | mx.array:
        return self._reference.offset

    def make_mask(self, n: int, window_size: int | None = None, return_array: bool = False) -> Any:
        return self._reference.make_mask(n, window_size, return_array)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        raise RuntimeError("a layer outside the shard was asked to write to its cache")


_original_quantized_sdpa = _mlx_base.quantized_scaled_dot_product_attention


def _attend(
    queries: mx.array,
    q_keys: Any,
    q_values: Any,
    *,
    scale: float,
    mask: Any,
    group_size: int = 64,
    bits: Any = 8,
) -> mx.array:
    if isinstance(bits, _Rows):
        return bits.view.attend(queries, scale, mask)
    out: mx.array = _original_quantized_sdpa(
        queries, q_keys, q_values, scale=scale, mask=mask, group_size=group_size, bits=bits
    )
    return out


def install() -> None:
    """Route mlx-lm's attention of a :class:`RowsCache` to per-row attention (idempotent; any other cache
    takes mlx-lm's own path unchanged)."""
    _mlx_base.quantized_scaled_dot_product_attention = _attend
