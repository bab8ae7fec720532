"""Placement by real bytes: tensor headers in the serving dtype, KV reserve, and the default dtype rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from exo_stable.engine.footprint import footprint_from_tensors, tensor_bytes
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype, QuantSpec
from exo_stable.engine.synthetic import tiny_spec
from exo_stable.node.node import NodeConfig, serving_dtype
from exo_stable.pipeline.placement import NodeResources, PlacementError, plan_placement

Q4 = {"m": QuantSpec(bits=4, group_size=32)}


def test_quantized_tensor_bytes_kept_or_expanded() -> None:
    # A 64 x 256 matrix in 4 bits: 64 x 32 uint32 words, 64 x 8 scales and biases.
    assert tensor_bytes("m.weight", (64, 32), "uint32", Q4, serving=Dtype.QUANTIZED, act_bytes=4) == 64 * 32 * 4
    assert tensor_bytes("m.scales", (64, 8), "float16", Q4, serving=Dtype.QUANTIZED, act_bytes=4) == 64 * 8 * 4
    assert tensor_bytes("m.weight", (64, 32), "uint32", Q4, serving=Dtype.FLOAT32, act_bytes=4) == 64 * 256 * 4
    assert tensor_bytes("m.biases", (64, 8), "float16", Q4, serving=Dtype.BFLOAT16, act_bytes=2) == 0
    assert tensor_bytes("n.weight", (64,), "bfloat16", {}, serving=Dtype.FLOAT32, act_bytes=4) == 256


def test_moe_layers_count_every_expert_and_the_heaviest_layer_sets_the_cost() -> None:
    spec = tiny_spec(layers=2, hidden=64)
    table = {
        "model.layers.0.mlp.gate_proj.weight": ((128, 64), "bfloat16"),
        "model.layers.1.mlp.switch_mlp.gate_proj.weight": ((8, 128, 64), "bfloat16"),
        "model.embed_tokens.weight": ((1000, 64), "bfloat16"),
    }
    fp = footprint_from_tensors(spec, table, {}, Dtype.BFLOAT16, act_bytes=2, kv_tokens=100)
    assert fp.bytes_per_layer == 8 * 128 * 64 * 2
    assert fp.kv_bytes_per_layer_reserve == 100 * 2 * spec.num_key_value_heads * (64 // 4) * 2
    assert fp.head_bytes == 0  # tied: the last stage holds a copy of the embedding


def test_default_model_refused_with_the_numbers_when_no_plan_fits(default_gguf: Path) -> None:
    source = open_model(default_gguf)
    quantized = source.footprint(Dtype.QUANTIZED, kv_tokens=0)
    expanded = source.footprint(Dtype.FLOAT32, kv_tokens=0)
    assert 4 * quantized.bytes_per_layer < expanded.bytes_per_layer  # 4.5-bit groups against float32
    with_kv = source.footprint(Dtype.QUANTIZED, kv_tokens=8 * 8192)
    nodes = [NodeResources("a", 1 << 30), NodeResources("b", 1 << 30)]
    with pytest.raises(PlacementError) as refused:
        plan_placement(nodes, with_kv, epoch=1, model_fingerprint="fp")
    assert "a: has 1.00 GiB" in str(refused.value) and "needs" in str(refused.value)
    assert len(plan_placement([*nodes, NodeResources("c", 2 << 30)], with_kv, epoch=1, model_fingerprint="f").stages)


def test_default_dtype_keeps_a_quantized_model_quantized_where_the_expanded_copy_would_not_fit(
    default_gguf: Path,
) -> None:
    source = open_model(default_gguf)
    roomy = NodeConfig(model=default_gguf, dtype=Dtype.FLOAT32, memory_bytes=8 << 30, max_context=512)
    assert serving_dtype(source, roomy) is Dtype.FLOAT32
    small = NodeConfig(model=default_gguf, dtype=Dtype.FLOAT32, memory_bytes=400 << 20, max_context=512)
    assert serving_dtype(source, small) is Dtype.QUANTIZED
