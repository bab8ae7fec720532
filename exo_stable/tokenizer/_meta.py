"""Reading ``tokenizer.ggml.*`` values: GGUF metadata arrives from mlx as arrays, lists or strings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["TokenizerError", "meta_bool", "meta_float_list", "meta_int", "meta_str", "meta_str_list", "to_python"]


class TokenizerError(ValueError):
    """The tokenizer description is unsupported or malformed."""


def to_python(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def _scalar(metadata: Mapping[str, Any], key: str) -> Any:
    value = to_python(metadata[key])
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def meta_int(metadata: Mapping[str, Any], key: str) -> int | None:
    if key not in metadata:
        return None
    value = _scalar(metadata, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenizerError(f"GGUF metadata {key!r} should be an integer, found {value!r}")
    return value


def meta_bool(metadata: Mapping[str, Any], key: str) -> bool | None:
    if key not in metadata:
        return None
    value = _scalar(metadata, key)
    if not isinstance(value, bool | int):
        raise TokenizerError(f"GGUF metadata {key!r} should be a boolean, found {value!r}")
    return bool(value)


def meta_str_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    if key not in metadata:
        raise TokenizerError(f"GGUF metadata lacks {key!r}")
    value = to_python(metadata[key])
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise TokenizerError(f"GGUF metadata {key!r} should be a list of strings")
    return list(value)


def meta_float_list(metadata: Mapping[str, Any], key: str, length: int) -> list[float]:
    if key not in metadata:
        raise TokenizerError(f"GGUF metadata lacks {key!r}")
    value = to_python(metadata[key])
    if not isinstance(value, list) or len(value) != length:
        raise TokenizerError(f"GGUF metadata {key!r} should hold {length} numbers")
    return [float(v) for v in value]


def meta_str(metadata: Mapping[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenizerError(f"GGUF metadata {key!r} should be a string, found {type(value).__name__}")
    return value
