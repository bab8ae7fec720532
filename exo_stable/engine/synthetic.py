"""Random-weight llama models of any shape, written as GGUF or MLX directories.

Tests use tiny ones (any number of layers, in a second) to check split points quickly; benchmarks use
published shapes without downloading anything. The tokenizer is borrowed from a real GGUF so that the
text side is realistic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx

from exo_stable.engine.gguf import scalar
from exo_stable.engine.modelspec import ModelSpec
from exo_stable.engine.random_model import tensor_shapes

_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)


def llama_spec(
    *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, context_length: int = 4096
) -> ModelSpec:
    """A llama of this shape (every random model here, tiny or published-size, is one)."""
    return ModelSpec(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        head_dim=hidden // heads,
        rope_theta=10000.0,
        rope_traditional=True,
        # An untied head keeps random logits from peaking on the input token (a tied one makes every
        # continuation repeat itself, which would make split-point tests blind).
        tie_word_embeddings=False,
        context_length=context_length,
    )


def tiny_spec(*, layers: int = 8, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 49152) -> ModelSpec:
    """The tests' tiny llama: a feed-forward twice the hidden size, a 2048-token context."""
    return llama_spec(
        layers=layers,
        hidden=hidden,
        intermediate=hidden * 2,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        context_length=2048,
    )


def random_weights(spec: ModelSpec, *, seed: int = 0, dtype: mx.Dtype = mx.float32) -> dict[str, mx.array]:
    """Weights in mlx-lm naming, scaled so activations stay in a sane range through many layers."""
    key = mx.random.key(seed)
    weights: dict[str, mx.array] = {}
    for name, shape in tensor_shapes(spec).items():
        if len(shape) == 1:
            weights[name] = mx.ones(shape, dtype=dtype)  # norms
            continue
        key, sub = mx.random.split(key)
        if name == "lm_head.weight":
            scale = 3.0 / spec.hidden_size**0.5  # logits of standard deviation ~3: varied, neither flat nor spiky
        else:
            scale = 1.0 if "embed" in name else shape[-1] ** -0.5
        weights[name] = (mx.random.normal(shape, key=sub) * scale).astype(dtype)
    mx.eval(weights)
    return weights


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, index, *rest = name.split(".")
        module, kind = ".".join(rest[:-1]), rest[-1]
        return f"blk.{index}.{_TO_GGUF[module]}.{kind}"
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, kind = name.rsplit(".", 1)
    return f"{top[module]}.{kind}"


def tokenizer_metadata(gguf: Path) -> dict[str, Any]:
    loaded = mx.load(str(gguf), return_metadata=True)
    assert isinstance(loaded, tuple)
    metadata = loaded[1]
    assert isinstance(metadata, dict)
    return {k: metadata[k] for k in _TOKENIZER_KEYS if k in metadata}


def write_gguf(path: Path, spec: ModelSpec, weights: Mapping[str, mx.array], tokenizer_meta: Mapping[str, Any]) -> Path:
    """Write a llama GGUF (float tensors) with the given tokenizer metadata."""
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads

    def u32(v: int) -> mx.array:
        return mx.array(v, dtype=mx.uint32)

    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": path.stem,
        "llama.block_count": u32(spec.num_hidden_layers),
        "llama.context_length": u32(spec.context_length),
        "llama.embedding_length": u32(spec.hidden_size),
        "llama.feed_forward_length": u32(spec.intermediate_size),
        "llama.attention.head_count": u32(spec.num_attention_heads),
        "llama.attention.head_count_kv": u32(spec.num_key_value_heads),
        "llama.attention.layer_norm_rms_epsilon": mx.array(spec.rms_norm_eps, dtype=mx.float32),
        "llama.rope.freq_base": mx.array(spec.rope_theta, dtype=mx.float32),
        "llama.rope.dimension_count": u32(head_dim),
        "llama.vocab_size": u32(spec.vocab_size),
    }
    meta.update(tokenizer_meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_gguf(str(path), {gguf_name(k): v for k, v in weights.items()}, meta)
    return path


def write_mlx_dir(path: Path, spec: ModelSpec, weights: Mapping[str, mx.array], tokenizer_source: Path) -> Path:
    """Write an MLX/Hugging Face model directory (config.json, safetensors, tokenizer files)."""
    from exo_stable.tokenizer import Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in spec.mlx_lm_args().items() if v is not None}
    config["max_position_embeddings"] = spec.context_length
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(path / "model.safetensors"), dict(weights))
    Tokenizer.from_gguf(tokenizer_source).save_hf_dir(path)
    return path


def tiny_gguf(path: Path, tokenizer_source: Path, *, layers: int = 8, seed: int = 0, **shape: int) -> Path:
    spec = tiny_spec(layers=layers, **shape)
    return write_gguf(path, spec, random_weights(spec, seed=seed), tokenizer_metadata(tokenizer_source))


__all__ = ["llama_spec", "random_weights", "scalar", "tiny_gguf", "tiny_spec", "write_gguf", "write_mlx_dir"]
