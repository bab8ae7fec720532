"""Read a llama-architecture GGUF file into mlx-lm's naming.

``mlx.core.load`` already decodes GGUF: Q4_0/Q4_1/Q8_0 tensors arrive as MLX-quantized
``weight``/``scales``/``biases`` triples with group size 32. This module only maps names, reads the
hyper-parameters from the metadata, and works out each tensor's bit width from its shapes (one file may
mix 4-bit and 8-bit tensors). q/k stay in GGUF's permuted layout, which is what MLX's
``rope_traditional=True`` expects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec

from exo_stable.modelspec import ModelSpec, QuantSpec, UnsupportedModelError

__all__ = ["UnsupportedModelError", "mlx_name", "quant_specs", "read_gguf", "scalar", "spec_from_metadata"]

SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|scales|biases|bias)$")


def scalar(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (MLX hands numbers back as 0-d arrays)."""
    if key not in metadata:
        if default is None:
            raise UnsupportedModelError(f"GGUF metadata has no {key!r}")
        return default
    value = metadata[key]
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def spec_from_metadata(metadata: Mapping[str, Any]) -> ModelSpec:
    arch = scalar(metadata, "general.architecture", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    heads = int(scalar(metadata, f"{arch}.attention.head_count"))
    hidden = int(scalar(metadata, f"{arch}.embedding_length"))
    rope_dim = int(scalar(metadata, f"{arch}.rope.dimension_count", hidden // heads))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = int(scalar(metadata, f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    return ModelSpec(
        hidden_size=hidden,
        num_hidden_layers=int(scalar(metadata, f"{arch}.block_count")),
        intermediate_size=int(scalar(metadata, f"{arch}.feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(scalar(metadata, f"{arch}.attention.head_count_kv", heads)),
        rms_norm_eps=float(scalar(metadata, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=vocab,
        head_dim=rope_dim,
        rope_theta=float(scalar(metadata, f"{arch}.rope.freq_base", 10000.0)),
        rope_traditional=True,  # GGUF permutes q/k for llama.cpp's rotary layout
        context_length=int(scalar(metadata, f"{arch}.context_length", 2048)),
        tie_word_embeddings=False,  # set by read_gguf from the tensors actually present
    )


def mlx_name(gguf_name: str) -> str:
    """Map one GGUF tensor name to mlx-lm's llama naming."""
    if m := _BLK.match(gguf_name):
        layer, part, kind = m.groups()
        if part not in _LAYER_MAP:
            raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_LAYER_MAP[part]}.{kind}"
    if (m := _TOP.match(gguf_name)) and m.group(1) in _GLOBAL_MAP:
        return f"{_GLOBAL_MAP[m.group(1)]}.{m.group(2)}"
    raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")


def quant_specs(weights: Mapping[str, mx.array], group_size: int = 32) -> dict[str, QuantSpec]:
    """Per-module quantization read from the shapes: packed uint32 columns against scale groups.

    GGUF's Q4_0/Q4_1/Q8_0 blocks are 32 weights, so the bit width is what remains unknown.
    """
    specs: dict[str, QuantSpec] = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name.removesuffix(".scales")
        packed_bits = weights[f"{module}.weight"].shape[-1] * 32
        in_features = scales.shape[-1] * group_size
        bits, rest = divmod(packed_bits, in_features)
        if rest or bits not in (2, 3, 4, 5, 6, 8):
            raise UnsupportedModelError(
                f"cannot infer the quantization of {module}: packed {packed_bits} bits for {in_features} inputs"
            )
        specs[module] = QuantSpec(bits=bits, group_size=group_size)
    return specs


def read_gguf(path: Path) -> tuple[ModelSpec, dict[str, mx.array], dict[str, Any]]:
    """Spec, weights in mlx-lm naming, and raw metadata of a GGUF file."""
    try:
        loaded = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedModelError(f"{path} is not a readable GGUF file: {exc}") from exc
    if not isinstance(loaded, tuple):
        raise UnsupportedModelError(f"{path} returned no metadata; not a GGUF file")
    raw_weights, metadata = loaded
    assert isinstance(raw_weights, dict) and isinstance(metadata, dict)
    spec = spec_from_metadata(metadata)
    weights = {mlx_name(k): v for k, v in raw_weights.items()}
    tied = "lm_head.weight" not in weights
    spec = msgspec.structs.replace(spec, tie_word_embeddings=tied)
    return spec, weights, dict(metadata)
