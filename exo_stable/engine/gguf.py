"""Read a GGUF file into mlx-lm's naming and configuration.

``mlx.core.load`` already decodes GGUF: Q4_0/Q4_1/Q8_0 tensors arrive as MLX-quantized
``weight``/``scales``/``biases`` triples with group size 32. This module maps llama.cpp's tensor names to
mlx-lm's (per architecture: llama, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3), reads the hyper-parameters
from the metadata into the family's mlx-lm configuration, and works out each tensor's bit width from its
shapes (one file may mix 4-bit and 8-bit tensors). Llama's q/k stay in GGUF's permuted layout, which is what
MLX's ``rope_traditional=True`` expects; the other architectures are not permuted by llama.cpp's converter.
Gemma's norm weights are stored by llama.cpp as ``1 + w``; mlx-lm's Gemma norms add the 1 themselves, so it is
taken off here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec

from exo_stable.engine.modelspec import ModelSpec, QuantSpec, UnsupportedModelError

__all__ = ["UnsupportedModelError", "mlx_name", "quant_specs", "read_gguf", "scalar", "spec_from_metadata"]

_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_MOE = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}
_PHI3 = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_GEMMA = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
LAYER_MAPS: dict[str, dict[str, str]] = {
    "llama": _COMMON,
    "qwen2": _COMMON,
    "qwen3": _COMMON,
    "qwen3moe": _COMMON | _MOE,
    "phi3": _COMMON | _PHI3,
    "gemma2": _COMMON | _GEMMA,
    "gemma3": _COMMON | _GEMMA,
}
SUPPORTED_ARCHITECTURES = tuple(LAYER_MAPS)
_MODEL_TYPES = {"qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}
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


def _architecture(metadata: Mapping[str, Any]) -> str:
    arch = scalar(metadata, "general.architecture", "")
    if arch not in LAYER_MAPS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return str(arch)


def spec_from_metadata(metadata: Mapping[str, Any], *, tied: bool = False) -> ModelSpec:
    """The model's spec: llama's from the named fields alone, the other architectures' with their mlx-lm
    configuration (``tied``: the file has no separate output head)."""
    arch = _architecture(metadata)

    def get(key: str, default: Any = None) -> Any:
        return scalar(metadata, f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // heads)))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens) if tokens is not None else 0))
    layers = int(get("block_count"))
    spec = ModelSpec(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=int(get("feed_forward_length", 0)),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=vocab,
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_traditional=arch == "llama",  # llama.cpp's converter permutes llama's q/k for its rotary layout
        context_length=int(get("context_length", 2048)),
        tie_word_embeddings=tied,
        model_type=_MODEL_TYPES.get(arch, arch),
    )
    if arch == "llama":
        return spec
    config = {k: v for k, v in spec.mlx_lm_args().items() if v is not None} | {"model_type": spec.model_type}
    config["max_position_embeddings"] = spec.context_length
    if arch == "qwen3moe":
        config |= {
            "num_experts": int(get("expert_count")),
            "num_experts_per_tok": int(get("expert_used_count")),
            "moe_intermediate_size": int(get("expert_feed_forward_length")),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        }
    if arch in ("gemma2", "gemma3"):
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models (1/sqrt(hidden / heads)).
        big = layers == (46 if arch == "gemma2" else 62)
        config["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    if arch == "gemma2":
        config["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0))
        config["final_logit_softcapping"] = float(get("final_logit_softcapping", 30.0))
    if arch == "gemma3":
        config["sliding_window"] = int(get("attention.sliding_window", 512))
        config["sliding_window_pattern"] = _window_pattern(get("attention.sliding_window_pattern", 6), layers)
        config["rope_local_base_freq"] = 10000.0
        factor = get("rope.scaling.factor", 0.0)
        if get("rope.scaling.type", "none") == "linear" and factor:
            config["rope_scaling"] = {"type": "linear", "factor": float(factor)}
    return msgspec.structs.replace(spec, config=config)


def _window_pattern(value: Any, layers: int) -> int:
    """Gemma 3's sliding-window pattern: every n-th layer global. llama.cpp writes n, or one flag per layer
    (true: sliding); mlx-lm's gemma3_text runs only a fixed period."""
    if isinstance(value, int):
        return value
    flags = [bool(v) for v in value]
    period = flags.index(False) + 1 if False in flags else 0
    if not period or any(flags[i] != ((i + 1) % period != 0) for i in range(len(flags))) or len(flags) != layers:
        raise UnsupportedModelError(f"gemma3 sliding-window layers {flags} are not a fixed period mlx-lm can run")
    return period


def mlx_name(gguf_name: str, arch: str = "llama") -> str:
    """Map one GGUF tensor name to mlx-lm's naming for the architecture."""
    layer_map = LAYER_MAPS.get(arch, _COMMON)
    if m := _BLK.match(gguf_name):
        layer, part, kind = m.groups()
        if part not in layer_map:
            raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r} for architecture {arch!r}")
        return f"model.layers.{layer}.{layer_map[part]}.{kind}"
    if (m := _TOP.match(gguf_name)) and m.group(1) in _GLOBAL_MAP:
        return f"{_GLOBAL_MAP[m.group(1)]}.{m.group(2)}"
    if gguf_name.startswith("rope_factors"):
        raise UnsupportedModelError(f"GGUF tensor {gguf_name!r}: long-context rope factors are not supported")
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
    arch = _architecture(metadata)
    weights = {mlx_name(k, arch): v for k, v in raw_weights.items()}
    if arch in ("gemma2", "gemma3"):
        for name, value in weights.items():
            if name.endswith("norm.weight"):
                weights[name] = value - mx.array(1.0, dtype=value.dtype)
    spec = spec_from_metadata(metadata, tied="lm_head.weight" not in weights)
    return spec, weights, dict(metadata)
