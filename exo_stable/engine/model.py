"""A contiguous range of a model's layers: the unit a pipeline stage (or one device) runs.

The layers are those of the model's mlx-lm family (see :mod:`exo_stable.engine.family`), run by the family's own
code. Stage 0 also holds the token embedding; the last stage also holds the final norm and the output head
(the embedding again when the model ties them). The whole model on one device is simply the shard
``[0, n_layers)``, so single-device and split runs execute the very same operations layer by layer.
The model never does IO: weights come in as a mapping of arrays.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.switch_layers import SwitchLinear

from exo_stable.engine.batching import RowsCache, RowsGhost
from exo_stable.engine.batching import install as install_row_attention
from exo_stable.engine.family import CacheKind, cache_kinds, cast_keeps, is_float, new_model
from exo_stable.engine.kvcache import GhostCache, RewindableRotatingKVCache
from exo_stable.engine.modelspec import Dtype, ModelSpec, QuantSpec, UnsupportedModelError
from exo_stable.engine.slots import StepIndex

_FLOAT_DTYPES = {Dtype.FLOAT32: mx.float32, Dtype.BFLOAT16: mx.bfloat16, Dtype.FLOAT16: mx.float16}


@dataclass(frozen=True, slots=True)
class LayerRange:
    """Layers ``[start, end)`` of a model with ``total`` layers."""

    start: int
    end: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.total:
            raise ValueError(f"invalid layer range [{self.start}, {self.end}) of {self.total}")

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.total

    def __str__(self) -> str:
        return f"[{self.start},{self.end})/{self.total}"


def quantized_activation_dtype() -> mx.Dtype:
    """Activations of a quantized model: float32 on CPUs and Metal (as llama.cpp), bfloat16 on CUDA GPUs,
    where float32 activations would double the traffic of every quantized matrix product."""
    from exo_stable.engine.device import on_cuda

    return mx.bfloat16 if on_cuda() else mx.float32


def compute_dtype(dtype: Dtype) -> mx.Dtype:
    """The activation dtype: see :func:`quantized_activation_dtype` for quantized weights, else the weights'."""
    return _FLOAT_DTYPES.get(dtype) or quantized_activation_dtype()


class _Feed:
    """What a non-first stage received, for the layer before its range to hand on (see :class:`_Before`)."""

    h: mx.array | None = None


class _Before(nn.Module):
    """A layer before the shard's range: its output is the hidden state the stage received."""

    def __init__(self, feed: _Feed, original: nn.Module) -> None:
        super().__init__()
        self._feed = feed
        _copy_flags(original, self)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        assert self._feed.h is not None
        return self._feed.h


class _After(nn.Module):
    """A layer after the shard's range, or the final norm of a stage that is not the last: passes its input on."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        _copy_flags(original, self)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return x


class _NoEmbedding(nn.Module):
    """The embedding of a stage that is not the first: zeros of the received hidden state's shape and dtype.

    The family's code may scale them; the layer before the range then replaces them with the received
    state, so none of it is ever evaluated."""

    def __init__(self, feed: _Feed) -> None:
        super().__init__()
        self._feed = feed

    def __call__(self, ids: mx.array) -> mx.array:
        assert self._feed.h is not None
        return mx.zeros(self._feed.h.shape, dtype=self._feed.h.dtype)


def _copy_flags(original: nn.Module, stand_in: nn.Module) -> None:
    """Plain flags a family's model loop may read from a layer (``use_sliding``, ``is_sliding``...)."""
    for key, value in vars(original).items():
        if not key.startswith("_") and isinstance(value, bool | int | float | str):
            object.__setattr__(stand_in, key, value)


class _Ticker:
    """Counts the shard's layers as the family's loop calls them, starting the device every ``every``, or
    keeping each layer's output in ``record`` (a call evaluated a few layers at a time)."""

    every = 0
    count = 0
    last = 0
    record: list[mx.array] | None = None


_TICKING: dict[type, type] = {}


def _ticking(layer: nn.Module, ticker: _Ticker) -> None:
    """Make ``layer`` start the device after it every ``ticker.every`` layers (same operations, same bits)."""
    cls = type(layer)
    if cls not in _TICKING:

        def call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            out = cls.__call__(self, *args, **kwargs)
            t: _Ticker = self._exo_ticker
            t.count += 1
            if t.record is not None:
                if isinstance(out, mx.array):
                    t.record.append(out)
            elif t.every and t.count % t.every == 0 and t.count < t.last:
                mx.async_eval(out)  # type: ignore[no-untyped-call]
            return out

        sub = type(cls.__name__, (cls,), {"__call__": call})
        _TICKING[cls] = sub
    layer.__class__ = _TICKING[cls]
    object.__setattr__(layer, "_exo_ticker", ticker)


class ShardModel:
    """Layers ``[start, end)`` of a model, run by the family's own mlx-lm ``Model``.

    The family's model keeps its structure and its global names (``model.layers.<index>``): the layers outside
    the range become stand-ins without weights, the embedding of a stage that is not the first too, and the
    final norm of a stage that is not the last passes its input on. A forward call is the family's own call
    (embedding scale, masks, sliding-window layers, head and soft-capping included): the first stage calls it on
    the token ids, a later one on dummy ids of the right shape, whose embedding the layer before its range
    replaces with the hidden state received. Stages that are not the last stop before the head.
    """

    def __init__(self, spec: ModelSpec, layers: LayerRange, net: nn.Module | None = None) -> None:
        self.spec = spec
        self.range = layers
        self.net = net if net is not None else new_model(spec)
        self.kinds = cache_kinds(self.net, spec)
        inner = self.net["model"]
        self.tied = "lm_head" not in self.net
        self._feed = _Feed()
        self._ticker = _Ticker()
        original = list(inner.layers)
        if len(original) != layers.total:
            raise ValueError(f"{spec.model_type} has {len(original)} layers, not {layers.total}")
        stand_ins: list[nn.Module] = []
        for index, layer in enumerate(original):
            if index < layers.start:
                stand_ins.append(_Before(self._feed, layer))
            elif index >= layers.end:
                stand_ins.append(_After(layer))
            else:
                _ticking(layer, self._ticker)
                stand_ins.append(layer)
        inner.layers = stand_ins
        if not layers.is_first and not (layers.is_last and self.tied):
            inner.embed_tokens = _NoEmbedding(self._feed)
        if not layers.is_last:
            inner.norm = _After(inner.norm)
            if "lm_head" in self.net:
                self.net.pop("lm_head")
        # A cache kind's first holder in this shard answers for the layers of that kind that others hold.
        self._twins: dict[CacheKind, int] = {}
        for local, kind in enumerate(self.kinds[layers.start : layers.end]):
            self._twins.setdefault(kind, local)

    def parameters(self) -> Any:
        return self.net.parameters()

    def make_cache(self) -> list[KVCache]:
        out: list[KVCache] = []
        for kind, max_size, keep in self.kinds[self.range.start : self.range.end]:
            if kind == "rotating":
                assert max_size is not None
                out.append(RewindableRotatingKVCache(max_size, keep))
            else:
                out.append(KVCache())
        return out

    def _whole_cache(self, cache: Sequence[KVCache]) -> list[Any]:
        reference = cache[0]
        whole: list[Any] = []
        for index, kind in enumerate(self.kinds):
            if self.range.start <= index < self.range.end:
                whole.append(cache[index - self.range.start])
            else:
                twin = self._twins.get(kind)
                whole.append(GhostCache(None if twin is None else cache[twin], reference))
        return whole

    def __call__(
        self, x: mx.array, cache: Sequence[KVCache], *, overlap: bool = True, record: list[mx.array] | None = None
    ) -> mx.array:
        """Token ids (first shard) or hidden states in; hidden states or logits (last shard) out.

        ``overlap=False``: start nothing on the device while building (a graph built before its input is
        written, see :meth:`StageCompute.prepare`). ``record``: start nothing either, and append each of
        the shard's layers' outputs to it, in order (see :mod:`exo_stable.engine.slicing`)."""
        if len(cache) != self.range.end - self.range.start:
            raise ValueError(f"{len(cache)} caches for shard {self.range}")
        return self._run(x, self._whole_cache(cache), overlap and record is None, record)

    @property
    def batchable(self) -> bool:
        """Whether :meth:`forward_rows` can run this model (full-attention caches only: a sliding-window
        layer's mask and rotation stay per request)."""
        return all(kind[0] == "kv" for kind in self.kinds)

    def forward_rows(self, x: mx.array, caches: Sequence[Sequence[KVCache]], *, overlap: bool = True) -> mx.array:
        """One decode position for each of ``len(caches)`` requests: ``x`` is ``[B, 1]`` token ids (first
        shard) or ``[B, 1, H]`` hidden states, row ``i`` with cache ``caches[i]`` (see
        :mod:`exo_stable.engine.batching`). Each row's cache advances by one, as a lone call's would.
        ``overlap``: as for a lone call."""
        if not self.batchable:
            raise ValueError(f"{self.spec.model_type}: sliding-window layers are not batched")
        width = self.range.end - self.range.start
        if len(caches) != x.shape[0] or any(len(c) != width for c in caches):
            raise ValueError(f"{len(caches)} cache lists for {x.shape[0]} rows of shard {self.range}")
        install_row_attention()
        shared = StepIndex()  # the rows' slots, lengths and mask: the same at every layer, built once
        views = [RowsCache([c[layer] for c in caches], shared) for layer in range(width)]
        whole: list[Any] = [
            views[index - self.range.start] if self.range.start <= index < self.range.end else RowsGhost(views[0])
            for index in range(len(self.kinds))
        ]
        return self._run(x, whole, overlap)

    def _run(self, x: mx.array, whole: list[Any], overlap: bool, record: list[mx.array] | None = None) -> mx.array:
        if self.range.is_first:
            ids = x
        else:
            self._feed.h = x
            ids = mx.zeros(x.shape[:2], dtype=mx.int32)
        self._ticker.every = _overlap_every() if overlap else 0
        self._ticker.count = 0
        self._ticker.last = self.range.end - self.range.start
        self._ticker.record = record
        try:
            out: mx.array = self.net(ids, cache=whole) if self.range.is_last else self.net["model"](ids, cache=whole)
        finally:
            self._feed.h = None
            self._ticker.record = None
        return out


OVERLAP_LAYERS = 4
"""On a GPU, a forward call starts every this many layers while the rest of its graph is being built.

benchmarks/gpu_overlap.py compares 1, 2 and 4 on the H200 (8B shape): two runs on the same day disagreed on
the order, the spread within noise, so the setting measured best first (4) stays."""


def _overlap_every() -> int:
    from exo_stable.engine.device import gpu_backend

    return OVERLAP_LAYERS if mx.default_device() == mx.gpu and gpu_backend() is not None else 0


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to (``model.layers.<index>.``...), or None for embeddings, norms, heads."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def shard_weight_names(spec: ModelSpec, layers: LayerRange, names: Sequence[str]) -> list[str]:
    """The subset of a model's tensor names that a shard may need: its layers' and the top-level ones (the
    embedding, final norm and head; :func:`build_shard` keeps of these only what the shard holds)."""
    wanted: list[str] = []
    # A family may decide in its sanitize whether the head is tied (gemma3_text: when the file has no lm_head).
    tied = spec.tie_word_embeddings or spec.config is not None
    needs_embed = layers.is_first or (layers.is_last and tied)
    for name in names:
        index = layer_index(name)
        if index is not None:
            if layers.start <= index < layers.end:
                wanted.append(name)
        elif name.startswith("model.embed_tokens."):
            if needs_embed:
                wanted.append(name)
        elif name.startswith(("model.norm.", "lm_head.")):
            if layers.is_last:
                wanted.append(name)
        else:
            wanted.append(name)
    return wanted


@dataclass(frozen=True, slots=True)
class KeptWeights:
    """The built parameters of a node's shard that its next shard (same model, same dtype) takes over.

    ``params`` are in their final form (converted, sanitized) under the whole model's names; ``quant`` says
    which of their modules are quantized and how; ``layers`` are the layer indices held whole, ``modules``
    the top-level modules (embedding, final norm, head) held. See :func:`kept_weights`.
    """

    params: dict[str, mx.array]
    quant: dict[str, QuantSpec]
    layers: frozenset[int]
    modules: frozenset[str]

    def covers(self, name: str) -> bool:
        """Whether the file tensor ``name`` need not be read: its layer or top-level module is kept."""
        index = layer_index(name)
        return index in self.layers if index is not None else name.rsplit(".", 1)[0] in self.modules


def kept_weights(old: ShardModel, layers: LayerRange) -> KeptWeights | None:
    """What of the built shard ``old`` a shard of ``layers`` can keep: the layers both ranges hold, and the
    top-level modules ``old`` holds (a new shard takes only those it needs). None when ``old`` is of another
    model shape. Nothing is copied: the new shard shares the arrays, which are never written."""
    if old.range.total != layers.total:
        return None
    common = frozenset(range(max(old.range.start, layers.start), min(old.range.end, layers.end)))
    params: dict[str, mx.array] = {}
    for item in tree_flatten(old.parameters()):
        name, value = str(item[0]), cast("mx.array", item[1])
        index = layer_index(name)
        if index is None or index in common:
            params[name] = value
    modules = {name.rsplit(".", 1)[0] for name in params}
    quant = {
        path: QuantSpec(bits=int(module.bits), group_size=int(module.group_size))
        for path, module in old.net.named_modules()
        if path in modules and isinstance(getattr(module, "bits", None), int)
    }
    top = frozenset(m for m in modules if layer_index(f"{m}.") is None)
    return KeptWeights(params, quant, common, top)


def build_shard(
    spec: ModelSpec,
    layers: LayerRange,
    weights: Mapping[str, mx.array],
    quant: Mapping[str, QuantSpec],
    dtype: Dtype,
    *,
    kept: KeptWeights | None = None,
) -> ShardModel:
    """Build the shard and load its weights, dequantizing or keeping them quantized per ``dtype``.

    ``weights`` and ``quant`` use the whole model's names (``model.layers.<global index>...``), as the files
    and the family's model do; the family's ``sanitize`` runs on the shard's part of them first. ``kept``:
    parameters an earlier shard of this node built in the same ``dtype`` (see :func:`kept_weights`); they
    stand in for the file tensors they came from (which the caller need not read) and go through the same
    steps, which leave them as they are.
    """
    net = new_model(spec)
    if kept is not None:
        weights = {**kept.params, **weights}
        quant = {**quant, **kept.quant}
    local = {name: weights[name] for name in shard_weight_names(spec, layers, list(weights))}
    if hasattr(net, "sanitize"):
        local = net.sanitize(local)  # a family may stack experts, drop unused tensors, or tie its head here
    model = ShardModel(spec, layers, net)
    expected = {str(item[0]) for item in tree_flatten(net.parameters())}
    modules = {name.rsplit(".", 1)[0] for name in expected}
    local_quant = {m: q for m, q in quant.items() if m in modules and f"{m}.scales" in local}
    if dtype is Dtype.QUANTIZED:

        def predicate(path: str, _module: nn.Module) -> bool | dict[str, Any]:
            q = local_quant.get(path)
            return False if q is None else {"group_size": q.group_size, "bits": q.bits}

        nn.quantize(net, class_predicate=predicate)
        act = quantized_activation_dtype()
        params = {k: (v.astype(act) if is_float(v) and not cast_keeps(net, k) else v) for k, v in local.items()}
    else:
        params = _dequantized(local, local_quant, _FLOAT_DTYPES[dtype], net)
        if mx.default_device() == mx.cpu:
            refuse_half_experts_on_cpu(spec, dtype, net)
    expected = {str(item[0]) for item in tree_flatten(net.parameters())}
    missing = expected - set(params)
    if missing:
        raise ValueError(f"model weights for shard {layers} lack {sorted(missing)[:8]}")
    net.load_weights([(k, v) for k, v in params.items() if k in expected], strict=True)
    mx.eval(net.parameters())
    return model


def refuse_half_experts_on_cpu(spec: ModelSpec, dtype: Dtype, net: nn.Module | None = None) -> None:
    """MLX's CPU backend multiplies gathered expert matrices (MoE layers) in float32 only: refuse before serving
    what would fail at the first forward call (call only for a CPU)."""
    if dtype not in (Dtype.BFLOAT16, Dtype.FLOAT16):
        return
    net = net if net is not None else new_model(spec)
    if any(isinstance(m, SwitchLinear) for m in net.modules()):
        raise UnsupportedModelError(
            f"model_type {spec.model_type!r}: MLX's CPU backend runs MoE expert layers in float32 only; "
            "use --dtype float32 or quantized on a CPU"
        )


def _dequantized(
    params: Mapping[str, mx.array], quant: Mapping[str, QuantSpec], dtype: mx.Dtype, net: nn.Module
) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for name, value in params.items():
        module, kind = name.rsplit(".", 1)
        if kind in ("scales", "biases") and module in quant:
            continue
        if kind == "weight" and module in quant:
            q = quant[module]
            # Dequantize in float32 (as llama.cpp does), then round once to the target dtype.
            out[name] = mx.dequantize(
                value,
                params[f"{module}.scales"].astype(mx.float32),
                params[f"{module}.biases"].astype(mx.float32),
                group_size=q.group_size,
                bits=q.bits,
            ).astype(dtype)
        elif is_float(value) and not cast_keeps(net, name):
            out[name] = value.astype(dtype)
        else:
            out[name] = value
    return out
