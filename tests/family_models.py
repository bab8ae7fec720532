"""Tiny random-weight models of every supported family, built with mlx-lm's own ``Model`` classes and written as
mlx-lm writes them (``save_model`` / ``save_config``: safetensors, sharded with an index when asked, and the
``quantization`` block with per-layer overrides when quantized). The tokenizer files are the default model's
vocabulary as a standard Hugging Face ``tokenizer.json``.

``python tests/family_models.py FAMILY DIR`` writes one, e.g. to serve it with ``scripts/local-cluster``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm.utils as mlx_utils
from mlx import nn
from mlx.utils import tree_flatten

VOCAB = 49152  # the default model's vocabulary, whose tokenizer the directories carry
LAYERS = 4

_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": LAYERS,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "attention_bias": False, "mlp_bias": False},
    # Mistral's sliding window, through llama's layer types: layers 0 and 2 see the last 6 positions only.
    "mistral": {
        "model_type": "mistral",
        "rope_theta": 1_000_000.0,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "sliding_window": 6,
    },
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},  # q/k/v biases, tied head
    "qwen3": {"model_type": "qwen3"},  # q/k norms
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "norm_topk_prob": True,
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "query_pre_attn_scalar": 16,
        "sliding_window": 5,  # short, so that the tests run past it and the sliding caches rotate
        "sliding_window_pattern": 3,
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
    },
    "gemma2": {
        "model_type": "gemma2",
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "phi3": {"model_type": "phi3", "num_key_value_heads": 4},  # fused qkv and gate_up projections
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 1.5,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "num_key_value_heads": 4,
    },
    "olmo2": {"model_type": "olmo2"},
    "starcoder2": {"model_type": "starcoder2", "norm_epsilon": 1e-5, "use_bias": True},
}

FAMILIES = sorted(CONFIGS)


def config_for(family: str) -> dict[str, Any]:
    return {**_BASE, **CONFIGS[family]}


def build(family: str, *, seed: int = 0, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """mlx-lm's own Model of the family with seeded random weights (norm weights and biases varied too).

    With a tied head, the layers' weights are scaled up so that what they add outweighs the input token's
    embedding: otherwise every position's top token is its input and the split tests would be blind."""
    config = config_for(family) | overrides
    seed += sum(map(ord, family))
    model_type = mlx_utils.MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    arch = __import__(f"mlx_lm.models.{model_type}", fromlist=["Model"])
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    key = mx.random.key(seed + 1)

    def vary(path: str, value: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        if value.ndim == 1:  # norms and biases: near their initial value, not all equal
            return value + 0.1 * mx.random.normal(value.shape, key=sub)
        if "embed_tokens" in path or "lm_head" in path:
            return mx.random.normal(value.shape, key=sub) * (embed if "embed" in path else 2.0 / value.shape[-1] ** 0.5)
        return value * gain

    gain, embed = (1.0, 1.0) if "lm_head" in model else (4.0, 0.1)

    flat = [(k, vary(k, v)) for k, v in tree_flatten(model.parameters())]
    model.load_weights(flat)
    mx.eval(model.parameters())
    return model, config


def write(
    family: str, path: Path, tokenizer_source: Path, *, seed: int = 0, quantize: bool = False, shards: int = 1
) -> Path:
    """The family's tiny model written as mlx-lm writes a model directory.

    ``quantize``: 4-bit affine groups of 32 with the second layer's MLP in 8 bits and its attention output left
    in float (per-layer overrides, as mlx-lm's mixed recipes write them). ``shards``: the weights in that many
    ``model-0000N-of-0000M.safetensors`` files with mlx-lm's index."""
    from exo_stable.tokenizer import Tokenizer

    model, config = build(family, seed=seed)
    if quantize:

        def predicate(p: str, m: nn.Module) -> bool | dict[str, Any]:
            if p.startswith("model.layers.1.mlp."):
                return {"group_size": 32, "bits": 8}
            return not p.startswith("model.layers.1.self_attn.o_proj")

        model, config = mlx_utils.quantize_model(model, config, 32, 4, quant_predicate=predicate)
    path.mkdir(parents=True, exist_ok=True)
    original = mlx_utils.make_shards
    if shards > 1:

        def split(weights: dict[str, mx.array], max_file_size_gb: int = 0) -> list[dict[str, mx.array]]:
            items = list(weights.items())
            size = -(-len(items) // shards)
            return [dict(items[i : i + size]) for i in range(0, len(items), size)]

        mlx_utils.make_shards = split
    try:
        mlx_utils.save_model(path, model)
    finally:
        mlx_utils.make_shards = original
    mlx_utils.save_config(config, path / "config.json")
    Tokenizer.from_gguf(tokenizer_source).save_hf_dir(path)
    return path


GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
GGUF_OVERRIDES: dict[str, dict[str, Any]] = {"qwen3_moe": {"mlp_only_layers": []}}  # llama.cpp: every layer MoE


def write_gguf(
    family: str, path: Path, tokenizer_source: Path, *, seed: int = 0, quantize: bool = False
) -> tuple[Path, nn.Module]:
    """The family's tiny model as llama.cpp's converter would write it, with the ``gguf`` package: tensor names
    from gguf's own name map (not exo-stable's), llama's q/k permuted, Gemma's norms stored as ``1 + w``.
    ``quantize``: the layers' matrices in llama.cpp's Q4_0 (attention) and Q8_0 (the rest, MoE experts
    included) blocks, where their rows are whole blocks. Returns the file and the mlx-lm model it holds."""
    import gguf
    import numpy as np
    from gguf.quants import quantize as quantize_blocks

    from exo_stable.engine.synthetic import tokenizer_metadata

    model, config = build(family, seed=seed, **GGUF_OVERRIDES.get(family, {}))
    arch = GGUF_ARCHITECTURES[family]
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), LAYERS)
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    writer.add_block_count(LAYERS)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(VOCAB)
    if family == "qwen3_moe":
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if family == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if family == "gemma3_text":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern(config["sliding_window_pattern"])
    meta = tokenizer_metadata(tokenizer_source)
    writer.add_tokenizer_model(str(meta["tokenizer.ggml.model"]))
    writer.add_tokenizer_pre(str(meta["tokenizer.ggml.pre"]))
    writer.add_token_list(list(meta["tokenizer.ggml.tokens"]))
    writer.add_token_merges(list(meta["tokenizer.ggml.merges"]))
    writer.add_token_types([int(t) for t in np.array(meta["tokenizer.ggml.token_type"]).tolist()])
    writer.add_bos_token_id(int(meta["tokenizer.ggml.bos_token_id"].item()))
    writer.add_eos_token_id(int(meta["tokenizer.ggml.eos_token_id"].item()))
    for name, value in tree_flatten(model.parameters()):
        module, kind = name.rsplit(".", 1)
        gguf_module = names.get_name(module.replace(".switch_mlp.", ".experts."))
        assert gguf_module is not None, name
        data = np.array(value.astype(mx.float32))
        if family == "llama" and module.endswith(("q_proj", "k_proj")):
            n = heads if module.endswith("q_proj") else kv_heads
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        if family.startswith("gemma") and module.endswith("norm"):
            data = data + np.float32(1.0)
        if quantize and data.ndim >= 2 and data.shape[-1] % 32 == 0 and ".layers." in name:
            kind_q = gguf.GGMLQuantizationType.Q4_0 if "self_attn" in name else gguf.GGMLQuantizationType.Q8_0
            blocks = quantize_blocks(data, kind_q)
            writer.add_tensor(f"{gguf_module}.{kind}", blocks, raw_shape=blocks.shape, raw_dtype=kind_q)
        else:
            writer.add_tensor(f"{gguf_module}.{kind}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def reference(path: Path, dtype: mx.Dtype | None = None) -> nn.Module:
    """The directory loaded by mlx-lm's own loader (sanitize, quantization), optionally cast as mlx-lm casts."""
    model, _ = mlx_utils.load_model(path)
    if dtype is not None:
        predicate = getattr(model, "cast_predicate", lambda _: True)
        flat = [
            (k, v.astype(dtype) if predicate(k) and mx.issubdtype(v.dtype, mx.floating) else v)
            for k, v in tree_flatten(model.parameters())
        ]
        model.load_weights(flat)
    mx.eval(model.parameters())
    return model


if __name__ == "__main__":
    from exo_stable.engine.store import ensure_default_model

    name, out = sys.argv[1], Path(sys.argv[2])
    write(name, out, ensure_default_model(progress=False), quantize="--quantized" in sys.argv)
    print(json.dumps({"family": name, "dir": str(out)}))
