"""A contiguous range of a llama model's layers: the unit a pipeline stage (or one device) runs.

Stage 0 also holds the token embedding; the last stage also holds the final norm and the output head
(the embedding again when the model ties them). The whole model on one device is simply the shard
``[0, n_layers)``, so single-device and split runs execute the very same operations layer by layer.
The model never does IO: weights come in as a mapping of arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.llama import ModelArgs, TransformerBlock

from exo_stable.modelspec import Dtype, ModelSpec, QuantSpec

_FLOAT_DTYPES = {Dtype.FLOAT32: mx.float32, Dtype.BFLOAT16: mx.bfloat16, Dtype.FLOAT16: mx.float16}
_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


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
    from exo_stable.device import on_cuda

    return mx.bfloat16 if on_cuda() else mx.float32


def compute_dtype(dtype: Dtype) -> mx.Dtype:
    """The activation dtype: see :func:`quantized_activation_dtype` for quantized weights, else the weights'."""
    return _FLOAT_DTYPES.get(dtype) or quantized_activation_dtype()


class ShardModel(nn.Module):
    """Layers ``[start, end)`` with the embedding on the first shard and norm + head on the last."""

    def __init__(self, spec: ModelSpec, layers: LayerRange) -> None:
        super().__init__()
        self.spec = spec
        self.range = layers
        args = ModelArgs.from_dict(spec.mlx_lm_args())
        if layers.is_first or (layers.is_last and spec.tie_word_embeddings):
            self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(layers.start, layers.end)]
        if layers.is_last:
            self.norm = nn.RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
            if not spec.tie_word_embeddings:
                self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def __call__(self, x: mx.array, cache: Sequence[KVCache], *, overlap: bool = True) -> mx.array:
        """Token ids (first shard) or hidden states in; hidden states or logits (last shard) out.

        ``overlap=False``: start nothing on the device while building (a graph built before its input is
        written, see :meth:`StageCompute.prepare`)."""
        h = self.embed_tokens(x) if self.range.is_first else x
        mask = create_attention_mask(h, cache[0])
        every = _overlap_every() if overlap else 0
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache, strict=True)):
            h = layer(h, mask, cache=layer_cache)
            if every and (i + 1) % every == 0 and i + 1 < len(self.layers):
                # On a GPU, start the layers built so far while Python builds the next ones: graph building
                # and device work overlap instead of taking turns. Same operations, same bits.
                mx.async_eval(h)  # type: ignore[no-untyped-call]
        if not self.range.is_last:
            return h
        h = self.norm(h)
        if self.spec.tie_word_embeddings:
            out: mx.array = self.embed_tokens.as_linear(h)
            return out
        head: mx.array = self.lm_head(h)
        return head


OVERLAP_LAYERS = 4
"""On a GPU, a forward call starts every this many layers while the rest of its graph is being built.

benchmarks/gpu_overlap.py compares 1, 2 and 4 on the H200 (8B shape): two runs on the same day disagreed on
the order, the spread within noise, so the setting measured best first (4) stays."""


def _overlap_every() -> int:
    from exo_stable.device import gpu_backend

    return OVERLAP_LAYERS if mx.default_device() == mx.gpu and gpu_backend() is not None else 0


def shard_weight_names(spec: ModelSpec, layers: LayerRange, names: Sequence[str]) -> list[str]:
    """The subset of a model's tensor names that a shard needs."""
    wanted: list[str] = []
    needs_embed = layers.is_first or (layers.is_last and spec.tie_word_embeddings)
    for name in names:
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if layers.start <= index < layers.end:
                wanted.append(name)
        elif name.startswith("model.embed_tokens."):
            if needs_embed:
                wanted.append(name)
        elif name.startswith(("model.norm.", "lm_head.")) and layers.is_last:
            wanted.append(name)
    return wanted


def build_shard(
    spec: ModelSpec,
    layers: LayerRange,
    weights: Mapping[str, mx.array],
    quant: Mapping[str, QuantSpec],
    dtype: Dtype,
) -> ShardModel:
    """Build the shard and load its weights, dequantizing or keeping them quantized per ``dtype``.

    ``weights`` uses whole-model names (``model.layers.<global index>...``); they are renumbered to
    the shard's local layer indices here.
    """
    model = ShardModel(spec, layers)
    local: dict[str, mx.array] = {}
    local_quant: dict[str, QuantSpec] = {}
    for name in shard_weight_names(spec, layers, list(weights)):
        local_name = _localize(name, layers)
        local[local_name] = weights[name]
        module = name.rsplit(".", 1)[0]
        if module in quant:
            local_quant[local_name.rsplit(".", 1)[0]] = quant[module]
    if dtype is Dtype.QUANTIZED:
        _quantize_modules(model, local_quant)
        act = quantized_activation_dtype()
        params = {
            k: (v.astype(act) if v.dtype in (mx.float16, mx.bfloat16, mx.float32) else v) for k, v in local.items()
        }
    else:
        params = _dequantized(local, local_quant, _FLOAT_DTYPES[dtype])
    missing = _missing(model, params)
    if missing:
        raise ValueError(f"model weights for shard {layers} lack {sorted(missing)[:8]}")
    model.load_weights(list(params.items()), strict=True)
    mx.eval(model.parameters())
    return model


def _localize(name: str, layers: LayerRange) -> str:
    if not name.startswith("model.layers."):
        # ShardModel keeps the top-level modules flat: embed_tokens, norm, lm_head.
        return name.removeprefix("model.")
    parts = name.split(".")
    parts[2] = str(int(parts[2]) - layers.start)
    return ".".join(parts[1:])


def _quantize_modules(model: ShardModel, quant: Mapping[str, QuantSpec]) -> None:
    if "embed_tokens" in quant and hasattr(model, "embed_tokens"):
        q = quant["embed_tokens"]
        model.embed_tokens = nn.QuantizedEmbedding(
            model.spec.vocab_size, model.spec.hidden_size, group_size=q.group_size, bits=q.bits
        )
    if "lm_head" in quant and hasattr(model, "lm_head"):
        q = quant["lm_head"]
        model.lm_head = nn.QuantizedLinear(
            model.spec.hidden_size, model.spec.vocab_size, bias=False, group_size=q.group_size, bits=q.bits
        )
    for index, layer in enumerate(model.layers):
        for path in _LINEARS:
            q_spec = quant.get(f"layers.{index}.{path}")
            if q_spec is None:
                continue
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            linear: nn.Linear = getattr(parent, attr)
            out_dims, in_dims = linear.weight.shape
            setattr(
                parent,
                attr,
                nn.QuantizedLinear(in_dims, out_dims, bias=False, group_size=q_spec.group_size, bits=q_spec.bits),
            )


def _dequantized(
    params: Mapping[str, mx.array], quant: Mapping[str, QuantSpec], dtype: mx.Dtype
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
        else:
            out[name] = value.astype(dtype)
    return out


def _missing(model: nn.Module, params: Mapping[str, Any]) -> set[str]:
    expected = {str(item[0]) for item in tree_flatten(model.parameters())}
    return expected - set(params)
