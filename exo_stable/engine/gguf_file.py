"""Read a GGUF file one tensor at a time: metadata and tensor headers without the weights, then only the
tensors a shard asks for, each converted to MLX's layout as it is read.

The header is parsed with the ``gguf`` package's memory-mapped :class:`gguf.GGUFReader` (only the header
pages are touched); a tensor's bytes are then read with ``pread`` at its offset, so that a node's resident
memory holds its own tensors and nothing mapped from the rest of the file. The conversion is the one
``mlx.core.load`` applies to a whole file (checked bit for bit in tests/test_gguf_file.py):

- F32 / F16 / BF16: the array, in GGML's reversed dimension order;
- Q4_0 / Q4_1 / Q8_0: MLX affine groups of 32 — a packed ``weight`` (uint32), ``scales`` and ``biases``
  (float16): Q4_0's bias is ``-8 * d``, Q4_1 keeps its ``m``, Q8_0's signed bytes become unsigned with
  bias ``-128 * d``.

Other GGML types (the K-quants...) are refused with the tensor's name and type, as ``mlx.core.load`` does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from exo_stable.engine.gguf import LAYER_MAPS, SUPPORTED_ARCHITECTURES, mlx_name
from exo_stable.engine.modelspec import QuantSpec, UnsupportedModelError

__all__ = ["GGUFIndex", "GGUFTensor", "open_gguf", "read_tensors"]

_GROUP = 32
_QUANT_BLOCK = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}  # bytes per block of 32, bits
_FLOAT = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One GGUF tensor's header: where its bytes are and what they become in MLX."""

    gguf_name: str
    name: str  # mlx-lm name of the weight (``...weight`` or ``...bias``)
    kind: str  # GGML type name
    shape: tuple[int, ...]  # numpy order (GGML's reversed)
    offset: int  # absolute, in the file
    n_bytes: int

    @property
    def quantized(self) -> bool:
        return self.kind in _QUANT_BLOCK

    @property
    def bits(self) -> int:
        return _QUANT_BLOCK[self.kind][1]

    def mlx_names(self) -> list[str]:
        """The MLX arrays this tensor becomes (a quantized weight brings its scales and biases)."""
        if not self.quantized:
            return [self.name]
        module = self.name.removesuffix(".weight")
        return [self.name, f"{module}.scales", f"{module}.biases"]

    def mlx_table(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The arrays this tensor becomes: name: (shape, MLX dtype name)."""
        if not self.quantized:
            return {self.name: (self.shape, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[self.kind])}
        rows, cols = self.shape[:-1], self.shape[-1]
        module = self.name.removesuffix(".weight")
        groups = (*rows, cols // _GROUP)
        return {
            self.name: ((*rows, cols * self.bits // 32), "uint32"),
            f"{module}.scales": (groups, "float16"),
            f"{module}.biases": (groups, "float16"),
        }

    def mlx_bytes(self, float_bytes: int | None = None) -> int:
        """Bytes in memory once converted: packed weights and float16 scales/biases, or ``float_bytes`` per
        element when the tensor is dequantized / cast (None: the file's float width)."""
        elements = int(np.prod(self.shape))
        if float_bytes is not None:
            return elements * float_bytes
        if self.quantized:
            return elements * self.bits // 8 + 2 * 2 * (elements // _GROUP)
        return elements * _FLOAT[self.kind][1]


@dataclass(frozen=True, slots=True)
class GGUFIndex:
    """A GGUF file's metadata (plain Python values) and tensor headers, keyed by mlx-lm name."""

    path: Path
    arch: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data_start: int

    def names(self) -> list[str]:
        """Every MLX array name the file yields (quantized weights with their scales and biases)."""
        return [n for t in self.tensors.values() for n in t.mlx_names()]

    def table(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every MLX array the file yields: name: (shape, dtype name), from headers."""
        return {k: v for t in self.tensors.values() for k, v in t.mlx_table().items()}

    def quant(self) -> dict[str, QuantSpec]:
        return {
            t.name.removesuffix(".weight"): QuantSpec(bits=t.bits, group_size=_GROUP)
            for t in self.tensors.values()
            if t.quantized
        }

    def header_digest(self) -> str:
        """A digest of the file's size, tensor headers (name, type, shape, offset) and metadata scalars:
        what identifies the model without reading a weight."""
        digest = hashlib.sha256(str(self.path.stat().st_size).encode())
        for t in sorted(self.tensors.values(), key=lambda t: t.name):
            digest.update(f"{t.name}:{t.kind}:{t.shape}:{t.offset};".encode())
        for key in sorted(self.metadata):
            value = self.metadata[key]
            if not isinstance(value, list):
                digest.update(f"{key}={value!r};".encode())
        return digest.hexdigest()


def _architecture(metadata: dict[str, Any]) -> str:
    arch = metadata.get("general.architecture", "")
    if arch not in LAYER_MAPS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return str(arch)


def open_gguf(path: Path) -> GGUFIndex:
    """Parse ``path``'s header: metadata and tensor headers; no weight is read."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise UnsupportedModelError(f"{path} is not a readable GGUF file: {exc}") from exc
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = _architecture(metadata)
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        name = mlx_name(t.name, arch)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if kind not in _QUANT_BLOCK and kind not in _FLOAT:
            raise UnsupportedModelError(
                f"GGUF tensor {t.name!r} is {kind}; supported types: {', '.join([*_FLOAT, *_QUANT_BLOCK])}"
            )
        if kind in _QUANT_BLOCK and shape[-1] % _GROUP:
            raise UnsupportedModelError(f"GGUF tensor {t.name!r}: {shape[-1]} columns are not whole blocks")
        tensors[name] = GGUFTensor(t.name, name, kind, shape, int(t.data_offset), int(t.n_bytes))
    start = int(reader.data_offset)
    del reader  # unmaps the file
    return GGUFIndex(path=path, arch=arch, metadata=metadata, tensors=tensors, data_start=start)


def _convert(tensor: GGUFTensor, raw: np.ndarray[Any, np.dtype[np.uint8]]) -> dict[str, mx.array]:
    if not tensor.quantized:
        dtype, _ = _FLOAT[tensor.kind]
        values = raw.view(dtype).reshape(tensor.shape)
        array = mx.array(values).view(mx.bfloat16) if tensor.kind == "BF16" else mx.array(values)
        return {tensor.name: array}
    block, bits = _QUANT_BLOCK[tensor.kind]
    rows = int(np.prod(tensor.shape[:-1]))
    groups = tensor.shape[-1] // _GROUP
    blocks = raw.reshape(rows * groups, block)
    scales = blocks[:, :2].copy().view(np.float16)
    if tensor.kind == "Q4_1":
        biases = blocks[:, 2:4].copy().view(np.float16)
        nibbles = blocks[:, 4:]
    elif tensor.kind == "Q4_0":
        biases = scales * np.float16(-8)
        nibbles = blocks[:, 2:]
    else:
        biases = scales * np.float16(-128)
        packed = (blocks[:, 2:] ^ np.uint8(0x80)).reshape(rows, groups * _GROUP)
    if bits == 4:
        # GGML: byte j holds weight j (low nibble) and weight j + 16 (high); MLX: two weights a byte in order.
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)
        packed = (values[:, 0::2] | (values[:, 1::2] << 4)).reshape(rows, groups * _GROUP // 2)
    out_shape = (*tensor.shape[:-1], tensor.shape[-1] * bits // 32)
    group_shape = (*tensor.shape[:-1], groups)
    module = tensor.name.removesuffix(".weight")
    return {
        tensor.name: mx.array(np.ascontiguousarray(packed).view(np.uint32).reshape(out_shape)),
        f"{module}.scales": mx.array(scales.reshape(group_shape)),
        f"{module}.biases": mx.array(biases.reshape(group_shape)),
    }


def read_tensors(index: GGUFIndex, names: Iterable[str]) -> dict[str, mx.array]:
    """The arrays ``names`` (mlx-lm names, as :meth:`GGUFIndex.names` lists them), read and converted one
    GGUF tensor at a time; each is evaluated before the next is read, so that only one raw tensor exists."""
    wanted = set(names)
    out: dict[str, mx.array] = {}
    fd = os.open(index.path, os.O_RDONLY)
    try:
        for tensor in index.tensors.values():
            parts = tensor.mlx_names()
            if not wanted.intersection(parts):
                continue
            data = os.pread(fd, tensor.n_bytes, tensor.offset)
            if len(data) != tensor.n_bytes:
                raise UnsupportedModelError(f"{index.path} is truncated inside tensor {tensor.gguf_name!r}")
            arrays = _convert(tensor, np.frombuffer(data, dtype=np.uint8))
            del data
            if index.arch in ("gemma2", "gemma3") and tensor.name.endswith("norm.weight"):
                # llama.cpp stores Gemma's norms as 1 + w; mlx-lm's Gemma adds the 1 itself (see gguf.py).
                value = arrays[tensor.name]
                arrays[tensor.name] = value - mx.array(1.0, dtype=value.dtype)
            mx.eval(list(arrays.values()))
            out.update({k: v for k, v in arrays.items() if k in wanted})
    finally:
        os.close(fd)
    return out
