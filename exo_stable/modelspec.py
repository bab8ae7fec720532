"""The shape of a decoder model, independent of where its weights come from."""

from __future__ import annotations

import enum
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
