"""What a model really costs in memory, from its tensor headers: the bytes each layer's tensors take in the
serving dtype, plus a KV-cache reserve and activations. Pure: the headers come in as a table.

A tensor is ``(shape, dtype)`` in mlx-lm naming, as the file yields it (a quantized module as its packed
``weight`` plus ``scales`` and ``biases``). In the quantized dtype a packed weight keeps its bytes and every
float tensor (scales and biases too) is held in the activation dtype, as :func:`exo_stable.engine.model.build_shard`
does; in a float dtype a quantized weight is expanded to ``32 / bits`` values a packed word and its scales
and biases are dropped. Mixture-of-experts layers are counted by their real tensors (every expert).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from exo_stable.engine.model import layer_index
from exo_stable.engine.modelspec import Dtype, ModelFootprint, ModelSpec, QuantSpec

__all__ = ["DTYPE_BYTES", "TensorTable", "footprint_from_tensors", "kv_bytes_per_token", "tensor_bytes"]

DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "uint32": 4,
    "int32": 4,
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int64": 8,
}
_FLOATS = ("float32", "float16", "bfloat16")
_SERVING = {Dtype.FLOAT32: 4, Dtype.BFLOAT16: 2, Dtype.FLOAT16: 2}

TensorTable = Mapping[str, tuple[tuple[int, ...], str]]
"""Tensor name: (shape, dtype name) — what a file's headers say."""


def tensor_bytes(
    name: str, shape: tuple[int, ...], dtype: str, quant: Mapping[str, QuantSpec], *, serving: Dtype, act_bytes: int
) -> int:
    """Bytes ``name`` takes once loaded for ``serving`` (``act_bytes``: the activation dtype's width)."""
    elements = math.prod(shape)
    module, kind = name.rsplit(".", 1) if "." in name else (name, "")
    q = quant.get(module)
    if q is not None and kind in ("scales", "biases"):
        return elements * act_bytes if serving is Dtype.QUANTIZED else 0
    if q is not None and kind == "weight":
        if serving is Dtype.QUANTIZED:
            return elements * DTYPE_BYTES.get(dtype, 4)
        return elements * (DTYPE_BYTES.get(dtype, 4) * 8 // q.bits) * _SERVING[serving]
    if dtype in _FLOATS:
        return elements * (act_bytes if serving is Dtype.QUANTIZED else _SERVING[serving])
    return elements * DTYPE_BYTES.get(dtype, 4)


def kv_bytes_per_token(spec: ModelSpec, value_bytes: int) -> int:
    """One layer's keys and values for one token."""
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    return 2 * spec.num_key_value_heads * head_dim * value_bytes


def footprint_from_tensors(
    spec: ModelSpec,
    tensors: TensorTable,
    quant: Mapping[str, QuantSpec],
    serving: Dtype,
    *,
    act_bytes: int,
    kv_tokens: int,
    batch_tokens: int = 512,
) -> ModelFootprint:
    """The model's :class:`ModelFootprint` for ``serving``: a layer costs its heaviest layer's tensors (layers
    of one model may differ: MoE and dense, mixed bit widths), its KV reserve is ``kv_tokens`` tokens (requests
    at once x context) in the activation dtype, and each stage keeps room for the activations of a prefill
    chunk of ``batch_tokens`` (hidden states and the widest intermediate, a few times over) in its per-layer
    share; the last stage's head also holds a few rows of logits."""
    per_layer = [0] * spec.num_hidden_layers
    embed = head = 0
    for name, (shape, dtype) in tensors.items():
        size = tensor_bytes(name, shape, dtype, quant, serving=serving, act_bytes=act_bytes)
        index = layer_index(name)
        if index is not None and 0 <= index < spec.num_hidden_layers:
            per_layer[index] += size
        elif name.startswith("model.embed_tokens."):
            embed += size
        elif name.startswith("lm_head."):
            head += size
        else:
            embed += size  # final norm and other small top-level tensors: counted with the first stage
    width = max(spec.hidden_size, spec.intermediate_size, 1)
    activations = 4 * batch_tokens * width * act_bytes
    logits = 8 * spec.vocab_size * act_bytes  # the last position's logits of a few requests at once
    tied = head == 0
    return ModelFootprint(
        n_layers=spec.num_hidden_layers,
        bytes_per_layer=max(per_layer) if per_layer else 0,
        embed_bytes=embed + activations,
        head_bytes=0 if tied else head + logits + activations,
        kv_bytes_per_layer_reserve=kv_tokens * kv_bytes_per_token(spec, act_bytes),
    )
