"""Activations as they cross stages: raw bytes with dtype and shape, so a received tensor is bit for bit the
one that was sent (bfloat16 travels as its 16-bit pattern)."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

WIRE_DTYPES: dict[str, tuple[mx.Dtype, type[np.generic]]] = {
    "float32": (mx.float32, np.float32),
    "float16": (mx.float16, np.float16),
    "bfloat16": (mx.bfloat16, np.uint16),
}
"""Each dtype that travels: its MLX dtype and the numpy dtype its bytes are read as."""

WireTensor = tuple[str, Sequence[int], bytes]
"""An activation as it travels: dtype name, shape and exact bytes (see :func:`tensor_to_bytes`)."""


def tensor_to_bytes(x: mx.array) -> tuple[str, tuple[int, ...], bytes]:
    """Exact bytes of an activation: (dtype name, shape, data)."""
    name = str(x.dtype).removeprefix("mlx.core.")
    if name not in WIRE_DTYPES:
        raise TypeError(f"activations of dtype {name} cannot travel")
    view = x.view(mx.uint16) if name == "bfloat16" else x
    return name, tuple(x.shape), np.array(view, copy=False).tobytes()


def tensor_from_bytes(dtype: str, shape: Sequence[int], data: bytes) -> mx.array:
    if dtype not in WIRE_DTYPES:
        raise TypeError(f"unknown activation dtype {dtype!r}")
    mx_dtype, np_dtype = WIRE_DTYPES[dtype]
    array = mx.array(np.frombuffer(data, dtype=np_dtype).reshape(tuple(shape)))
    return array.view(mx.bfloat16) if dtype == "bfloat16" else array.astype(mx_dtype)


def input_array(tokens: Sequence[int], tensor: WireTensor | None = None) -> mx.array:
    """A forward call's input as it came: token ids ``[1, L]`` (first stage) or an activation's exact bytes."""
    return mx.array([list(tokens)], dtype=mx.int32) if tensor is None else tensor_from_bytes(*tensor)


def fill_input(slot: mx.array, tokens: Sequence[int], tensor: WireTensor | None) -> bool:
    """Write a one-position input (a token id, or an activation's exact bytes) into an evaluated array's
    buffer in place (a prepared step's placeholder); false, nothing written, if it does not fit."""
    view = np.array(slot, copy=False)
    if tensor is None:
        if len(tokens) != 1 or view.shape != (1, 1):
            return False
        view[0, 0] = tokens[0]
        return True
    dtype, shape, data = tensor
    wire = WIRE_DTYPES.get(dtype)
    if wire is None or tuple(shape) != view.shape or np.dtype(wire[1]) != view.dtype:
        return False
    view[...] = np.frombuffer(data, dtype=wire[1]).reshape(view.shape)
    return True
