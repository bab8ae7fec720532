"""The shape of a decoder model, independent of where its weights come from."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import msgspec


class UnsupportedModelError(ValueError):
    """The file is readable but is not a model exo-stable can run."""


class Dtype(enum.StrEnum):
    """How weights are held in memory.

    ``quantized`` keeps the file's quantized tensors (4/8-bit affine groups) and computes in float32;
    the float choices dequantize every tensor at load time.
    """

    QUANTIZED = "quantized"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Hyper-parameters of a decoder (mlx-lm's ``ModelArgs`` is built from this).

    The named fields are what the runtime itself reads (layer count, widths for placement and activations,
    vocabulary, context). ``config`` is the family's whole mlx-lm configuration (``model_type`` included) when
    the model is not a plain llama described by the named fields alone: it is what the family's own
    ``ModelArgs`` is built from.
    """

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, float | str] | None = None
    tie_word_embeddings: bool = True
    context_length: int = 2048
    model_type: str = "llama"
    config: dict[str, Any] | None = None

    def mlx_lm_args(self) -> dict[str, Any]:
        if self.config is not None:
            return dict(self.config)
        return {
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_traditional": self.rope_traditional,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.context_length,
        }


class QuantSpec(msgspec.Struct, frozen=True):
    """Affine group quantization of one tensor: ``w = scale * q + bias`` per group."""

    bits: int
    group_size: int


@dataclass(frozen=True, slots=True)
class ModelFootprint:
    """The memory a model needs, in bytes.

    ``head_bytes`` is 0 when the output head is tied to the embeddings: the last stage then holds a copy
    of the embedding table (``embed_bytes``) as its head. ``kv_bytes_per_layer_reserve`` is the KV cache
    room to keep free per layer.
    """

    n_layers: int
    bytes_per_layer: int
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_layer_reserve: int = 0

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"a model needs at least one layer, got {self.n_layers}")
        for name in ("bytes_per_layer", "embed_bytes", "head_bytes", "kv_bytes_per_layer_reserve"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    @property
    def per_layer(self) -> int:
        """Bytes one layer costs on a stage: weights plus the KV reserve."""
        return self.bytes_per_layer + self.kv_bytes_per_layer_reserve

    def fixed_bytes(self, stage: int, n_stages: int) -> int:
        """The bytes stage ``stage`` of ``n_stages`` needs besides its layers (embeddings, head)."""
        fixed = self.embed_bytes if stage == 0 else 0
        if stage == n_stages - 1:
            if self.head_bytes:
                fixed += self.head_bytes
            elif n_stages > 1:
                fixed += self.embed_bytes  # tied head: the last stage needs its own copy of the table
        return fixed

    def stage_bytes(self, stage: int, n_stages: int, layers: int) -> int:
        """Everything stage ``stage`` of ``n_stages`` needs to run ``layers`` layers."""
        return layers * self.per_layer + self.fixed_bytes(stage, n_stages)


def footprint_from_spec(
    spec: ModelSpec, bytes_per_param: float, *, kv_tokens: int = 0, kv_bytes_per_value: float = 4.0
) -> ModelFootprint:
    """Estimate a llama-style model's footprint from its hyper-parameters.

    Per layer: the q/k/v/o projections (``hidden x heads*head_dim``, ``hidden x kv_heads*head_dim`` twice,
    ``heads*head_dim x hidden``), the gated MLP (``3 x hidden x intermediate``) and two RMS norms. The
    embedding table is ``vocab x hidden``; an untied head is another one. The final norm is negligible and
    left out. ``kv_tokens`` reserves a KV cache of that many tokens per layer (keys and values, ``kv_heads
    * head_dim`` values each, ``kv_bytes_per_value`` bytes a value).
    """
    if bytes_per_param <= 0:
        raise ValueError(f"bytes_per_param must be positive, got {bytes_per_param}")
    if kv_tokens < 0 or kv_bytes_per_value < 0:
        raise ValueError("kv_tokens and kv_bytes_per_value must be non-negative")
    hidden = spec.hidden_size
    head_dim = spec.head_dim or hidden // spec.num_attention_heads
    q_width = spec.num_attention_heads * head_dim
    kv_width = spec.num_key_value_heads * head_dim
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    mlp = 3 * hidden * spec.intermediate_size
    layer_params = attention + mlp + 2 * hidden
    embed_params = spec.vocab_size * hidden
    return ModelFootprint(
        n_layers=spec.num_hidden_layers,
        bytes_per_layer=math.ceil(layer_params * bytes_per_param),
        embed_bytes=math.ceil(embed_params * bytes_per_param),
        head_bytes=0 if spec.tie_word_embeddings else math.ceil(embed_params * bytes_per_param),
        kv_bytes_per_layer_reserve=math.ceil(2 * kv_width * kv_tokens * kv_bytes_per_value),
    )
