"""Which mlx-lm model families a shard can run, and why the others are refused.

A family is an mlx-lm module ``mlx_lm.models.<model_type>`` whose ``Model`` holds the decoder as
``model.model`` (``embed_tokens``, ``layers``, ``norm``) with the head on ``model`` itself, and whose caches
are plain or sliding-window KV caches: then any layer range of it runs with the family's own code (see
:mod:`exo_stable.engine.model`). The families below are the ones the test suite proves (logits equal mlx-lm's, every
split point equal to the whole); any other is refused at start with the reason.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models.cache import KVCache, RotatingKVCache

from exo_stable.engine.modelspec import ModelSpec, UnsupportedModelError

REMAP = {"mistral": "llama"}
"""``model_type`` values that mlx-lm runs with another family's module (as its own loader does)."""

SUPPORTED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3_text",
    "phi3",
    "deepseek_v3",
    "olmo2",
    "starcoder2",
)
"""Families whose tiny random-weight models pass tests/test_families.py."""

REFUSED = {
    "gemma3n": "its layers also read per-layer inputs computed from the token ids, which a later stage lacks",
    "gemma3": "it is a vision-language wrapper; serve its text model (model_type gemma3_text)",
    "mistral3": "it is a vision-language wrapper around another family",
    "qwen3_next": "its linear-attention layers keep recurrent state, which cannot be rewound or replayed exactly",
    "qwen3_5": "its linear-attention layers keep recurrent state, which cannot be rewound or replayed exactly",
    "mamba": "it keeps recurrent state instead of a KV cache",
    "mamba2": "it keeps recurrent state instead of a KV cache",
    "deepseek_v32": "its sparse-attention indexer keeps a cache of its own across layers",
    "llama4": "its chunked-attention cache cannot be rewound",
}


def family_name(spec: ModelSpec) -> str:
    return REMAP.get(spec.model_type, spec.model_type)


def check_supported(model_type: str) -> None:
    """Raise :class:`UnsupportedModelError` naming the family and why, unless it is a supported one."""
    if model_type in SUPPORTED:
        return
    reason = REFUSED.get(model_type)
    if reason is None:
        try:
            importlib.import_module(f"mlx_lm.models.{REMAP.get(model_type, model_type)}")
        except ImportError:
            reason = "mlx-lm has no model class for it"
        else:
            reason = "it is not among the families tested to split exactly"
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported: {reason} (supported: {', '.join(SUPPORTED)})"
    )


def module_for(spec: ModelSpec) -> ModuleType:
    check_supported(spec.model_type)
    return importlib.import_module(f"mlx_lm.models.{family_name(spec)}")


def new_model(spec: ModelSpec) -> nn.Module:
    """The family's whole mlx-lm ``Model`` with lazily initialised (never evaluated) parameters."""
    module = module_for(spec)
    args = module.ModelArgs.from_dict(spec.mlx_lm_args())
    model: nn.Module = module.Model(args)
    inner = model.get("model") if isinstance(model, dict) else None
    missing = [part for part in ("embed_tokens", "layers", "norm") if inner is None or part not in inner]
    if missing:
        raise UnsupportedModelError(
            f"model_type {spec.model_type!r}: mlx-lm's Model has no model.{', model.'.join(missing)}, "
            "which a layer-range shard needs"
        )
    return model


CacheKind = tuple[str, int | None, int]
"""What a layer's cache is: ("kv", None, 0) or ("rotating", max_size, keep)."""


def cache_kinds(model: nn.Module, spec: ModelSpec) -> list[CacheKind]:
    """The kind of cache the family gives each layer; a kind a shard cannot rewind is refused."""
    n = spec.num_hidden_layers
    template = model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in range(n)]
    kinds: list[CacheKind] = []
    for index, cache in enumerate(template):
        if type(cache) is KVCache:
            kinds.append(("kv", None, 0))
        elif type(cache) is RotatingKVCache:
            kinds.append(("rotating", int(cache.max_size), int(cache.keep)))
        else:
            raise UnsupportedModelError(
                f"model_type {spec.model_type!r}: layer {index} uses a {type(cache).__name__}, "
                "which cannot be rewound for replay and spot checks"
            )
    if len(kinds) != n:
        raise UnsupportedModelError(f"model_type {spec.model_type!r}: {len(kinds)} caches for {n} layers")
    return kinds


def cast_keeps(model: nn.Module, name: str) -> bool:
    """Whether a float tensor keeps its file dtype instead of the serving dtype (mlx-lm's cast_predicate)."""
    predicate: Any = getattr(model, "cast_predicate", None)
    return predicate is not None and not predicate(name)


def is_float(x: mx.array) -> bool:
    return x.dtype in (mx.float16, mx.bfloat16, mx.float32)
