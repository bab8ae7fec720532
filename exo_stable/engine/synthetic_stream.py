"""Random-weight llama models of any size, written to disk one tensor at a time.

:mod:`exo_stable.engine.synthetic` builds a whole model in memory; these writers never hold more than one tensor, so
that the memory benchmark (benchmarks/bench_memory.py) and its CI test can write models bigger than a node's
budget: an MLX / Hugging Face directory (bfloat16 safetensors, sharded with an index as the hub does) and a
GGUF file (Q4_0 / Q8_0 blocks drawn directly: a random scale per block of 32 and random codes). The tokenizer
is a real GGUF's (the default model's in the benchmark), as :mod:`exo_stable.engine.synthetic` does.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from exo_stable.engine.modelspec import ModelSpec
from exo_stable.engine.random_model import tensor_shapes
from exo_stable.engine.synthetic import gguf_name
from exo_stable.tokenizer import Tokenizer

__all__ = [
    "check_disk",
    "model_bytes",
    "tokenizer_source_metadata",
    "write_gguf_stream",
    "write_mlx_stream",
]


def model_bytes(spec: ModelSpec, bytes_per_param: float) -> int:
    return int(sum(int(np.prod(s)) for s in tensor_shapes(spec).values()) * bytes_per_param)


def check_disk(directory: Path, needed: int) -> None:
    """Refuse to start writing what the disk cannot hold (with 1 GiB to spare)."""
    free = shutil.disk_usage(directory).free
    if free < needed + (1 << 30):
        raise OSError(f"{directory} has {free / 2**30:.1f} GiB free; writing the model needs {needed / 2**30:.1f} GiB")


def _scale(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> float:
    """Standard deviation of a matrix: 1/sqrt(fan-in), 1 for the embedding, logits of deviation ~3."""
    if name == "lm_head.weight":
        return 3.0 / math.sqrt(spec.hidden_size)
    return 1.0 if "embed" in name else 1.0 / math.sqrt(shape[-1])


def _float_tensors(spec: ModelSpec, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) in file order; norms are ones."""
    rng = np.random.default_rng(seed)
    for name, shape in tensor_shapes(spec).items():
        if len(shape) == 1:
            yield name, np.ones(shape, dtype=np.float32)
            continue
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(_scale(spec, name, shape))
        yield name, out


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    bits = x.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def tokenizer_source_metadata(gguf_path: Path) -> dict[str, Any]:
    """A real GGUF's tokenizer metadata (header only), to give a random model a realistic tokenizer."""
    from exo_stable.engine.gguf_file import open_gguf

    return {k: v for k, v in open_gguf(gguf_path).metadata.items() if k.startswith("tokenizer.")}


def write_mlx_stream(
    path: Path, spec: ModelSpec, tokenizer: dict[str, Any], *, seed: int = 0, shard_bytes: int = 1 << 30
) -> Path:
    """A Hugging Face layout directory: config.json, tokenizer files, model-0000N-of-0000M.safetensors in
    bfloat16 with model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(spec)
    files: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if files[-1] and size + n > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += n
    total = len(files)
    weight_map: dict[str, str] = {}
    gen = _float_tensors(spec, seed)
    for i, names in enumerate(files):
        file_name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for name in names:
            n = int(np.prod(shapes[name])) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file_name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (path / file_name).open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for name in names:
                got, values = next(gen)
                assert got == name
                fh.write(_bf16(values).tobytes())
    index = {"metadata": {"total_size": sum(model_bytes_of(shapes[n]) for n in weight_map)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {k: v for k, v in spec.mlx_lm_args().items() if v is not None}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    Tokenizer.from_gguf_metadata(tokenizer).save_hf_dir(path)
    return path


def model_bytes_of(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * 2


_BLOCKS = {"Q4_0": (18, 16), "Q8_0": (34, 32)}  # bytes per block, bytes of codes


def _quant_blocks(kind: str, shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Random blocks whose dequantized values have deviation ``std`` (drawn as codes, never as floats)."""
    rows, cols = shape
    block, codes = _BLOCKS[kind]
    groups = rows * cols // 32
    out = np.empty((groups, block), dtype=np.uint8)
    # Uniform codes have standard deviation ~ (levels / sqrt(12)); pick d so that d * codes has ``std``.
    levels = 16 if kind == "Q4_0" else 256
    d = np.full(groups, std / (levels / 12**0.5), dtype=np.float16)
    out[:, :2] = d.view(np.uint8).reshape(groups, 2)
    out[:, 2:] = rng.integers(0, 256, size=(groups, codes), dtype=np.uint8)
    return out.reshape(rows, cols // 32 * block)


def write_gguf_stream(
    path: Path, spec: ModelSpec, tokenizer: dict[str, Any], *, kind: str = "Q8_0", seed: int = 0
) -> Path:
    """A llama GGUF: matrices in ``kind`` (Q4_0 or Q8_0) blocks, norms in F32, with the synthetic tokenizer."""
    import gguf

    if kind not in _BLOCKS:
        raise ValueError(f"kind must be one of {sorted(_BLOCKS)}")
    qtype = gguf.GGMLQuantizationType[kind]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(spec.num_hidden_layers)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_attention_heads)
    writer.add_head_count_kv(spec.num_key_value_heads)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.head_dim or spec.hidden_size // spec.num_attention_heads)
    writer.add_vocab_size(spec.vocab_size)
    for key, value in tokenizer.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            assert isinstance(value, list)
            if not value:
                continue  # GGUF cannot hold an empty array (the synthetic tokenizer has no merges)
            first = value[0]
            sub = (
                gguf.GGUFValueType.STRING
                if isinstance(first, str)
                else gguf.GGUFValueType.FLOAT32
                if isinstance(first, float)
                else gguf.GGUFValueType.INT32
            )
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=sub)
    shapes = tensor_shapes(spec)
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            rows, cols = shape
            block = _BLOCKS[kind][0]
            writer.add_tensor_info(
                gguf_name(name), (rows, cols // 32 * block), np.dtype(np.uint8), rows * cols // 32 * block, qtype
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            writer.write_tensor_data(_quant_blocks(kind, shape, _scale(spec, name, shape), rng))
    writer.close()
    return path
