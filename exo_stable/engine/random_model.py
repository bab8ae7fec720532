"""Llama models of published shapes with seeded random weights, generated where they run.

``random:llama-3-8b`` (or ``random:llama-3-8b@7`` for seed 7) names a model that needs no download: its
spec is a published shape, and each tensor is drawn from a generator keyed by (seed, tensor name), so a
stage that holds layers [k, n) builds exactly the tensors the whole model has there without making the
others. Weights are drawn on the default device (the GPU when there is one) in bfloat16, or drawn and then
quantized to 4-bit affine groups. Benchmarks use these to measure speed at real sizes; the numbers a
random model produces are meaningless as text but deterministic, which is all a token-identity check needs.

The tokenizer is synthetic and byte-level: the 256 byte tokens, fillers up to the vocabulary size (each
decodes to a short word), and begin/end-of-text control tokens at the end. Text encodes to bytes only.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import mlx.core as mx

from exo_stable.engine.modelspec import ModelSpec, QuantSpec
from exo_stable.tokenizer import Tokenizer, byte_level_decode_map

PREFIX = "random:"
QUANT = QuantSpec(bits=4, group_size=64)
"""How ``--dtype quantized`` stores a random model's linear layers (embedding and head included)."""


def _llama3(layers: int, hidden: int, ffn: int, heads: int, *, tie: bool = False) -> ModelSpec:
    return ModelSpec(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        vocab_size=128256,
        head_dim=hidden // heads,
        rope_theta=500000.0,
        tie_word_embeddings=tie,
        context_length=8192,
    )


SHAPES: dict[str, ModelSpec] = {
    # Published Llama 3 / 3.1 / 3.2 shapes (layers, width, feed-forward width, heads; 8 KV heads each).
    "llama-3-70b": _llama3(80, 8192, 28672, 64),
    "llama-3-8b": _llama3(32, 4096, 14336, 32),
    "llama-3.2-3b": _llama3(28, 3072, 8192, 24, tie=True),
    "llama-3.2-1b": _llama3(16, 2048, 8192, 32, tie=True),
    # Small enough for a CPU test run, with the same structure.
    "tiny": ModelSpec(
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=1024,
        head_dim=16,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        context_length=2048,
    ),
}


@dataclass(frozen=True)
class RandomModel:
    """What a ``random:<shape>[@seed]`` name stands for."""

    shape: str
    seed: int
    spec: ModelSpec

    @property
    def name(self) -> str:
        return f"random-{self.shape}" + (f"@{self.seed}" if self.seed else "")

    def fingerprint(self, tokenizer: Tokenizer) -> str:
        digest = hashlib.sha256(f"{PREFIX}{self.shape}@{self.seed}:{self.spec!r}".encode())
        digest.update(tokenizer.fingerprint().encode())
        return digest.hexdigest()[:32]


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str) -> RandomModel:
    """``random:<shape>`` or ``random:<shape>@<seed>``; a clear error lists the shapes."""
    if not is_random(name):
        raise ValueError(f"{name!r} does not name a random model (expected {PREFIX}<shape>[@seed])")
    shape, _, seed_text = name.removeprefix(PREFIX).partition("@")
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise ValueError(f"the seed in {name!r} is not an integer") from None
    return RandomModel(shape, seed, SHAPES[shape])


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, in mlx-lm naming, with its shape."""
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (spec.num_attention_heads * head_dim, spec.hidden_size),
            f"{p}.self_attn.k_proj.weight": (spec.num_key_value_heads * head_dim, spec.hidden_size),
            f"{p}.self_attn.v_proj.weight": (spec.num_key_value_heads * head_dim, spec.hidden_size),
            f"{p}.self_attn.o_proj.weight": (spec.hidden_size, spec.num_attention_heads * head_dim),
            f"{p}.mlp.gate_proj.weight": (spec.intermediate_size, spec.hidden_size),
            f"{p}.mlp.up_proj.weight": (spec.intermediate_size, spec.hidden_size),
            f"{p}.mlp.down_proj.weight": (spec.hidden_size, spec.intermediate_size),
            f"{p}.input_layernorm.weight": (spec.hidden_size,),
            f"{p}.post_attention_layernorm.weight": (spec.hidden_size,),
        }
    shapes["model.norm.weight"] = (spec.hidden_size,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    return shapes


def _tensor(name: str, shape: tuple[int, ...], spec: ModelSpec, seed: int, dtype: mx.Dtype) -> mx.array:
    if len(shape) == 1:
        return mx.ones(shape, dtype=dtype)  # norms
    key = mx.random.key((seed * 1_000_003 + zlib.crc32(name.encode())) & 0xFFFFFFFF)
    if name == "lm_head.weight":
        scale = 3.0 / spec.hidden_size**0.5  # logits of standard deviation ~3: varied, neither flat nor spiky
    elif "embed" in name:
        scale = 1.0
    else:
        scale = shape[-1] ** -0.5  # keeps activations in range through any number of layers
    return mx.random.normal(shape, dtype=dtype, key=key) * mx.array(scale, dtype=dtype)


def generate(
    model: RandomModel, names: Iterable[str], *, dtype: mx.Dtype = mx.bfloat16, quantize: bool = False
) -> tuple[dict[str, mx.array], dict[str, QuantSpec]]:
    """The named tensors (whole-model names), evaluated one by one so that peak memory stays one tensor.

    With ``quantize``, every 2-D tensor is stored as 4-bit groups (``.weight`` + ``.scales`` + ``.biases``)
    and the returned quant map names the quantized modules, as a quantized file would.
    """
    shapes = tensor_shapes(model.spec)
    weights: dict[str, mx.array] = {}
    quant: dict[str, QuantSpec] = {}
    for name in names:
        if name not in shapes:
            raise KeyError(f"{model.name} has no tensor {name!r}")
        value = _tensor(name, shapes[name], model.spec, model.seed, dtype)
        module = name.rsplit(".", 1)[0]
        if quantize and value.ndim == 2:
            q, scales, biases = mx.quantize(value, group_size=QUANT.group_size, bits=QUANT.bits)
            weights |= {f"{module}.weight": q, f"{module}.scales": scales, f"{module}.biases": biases}
            quant[module] = QUANT
            mx.eval(q, scales, biases)
        else:
            weights[name] = value
            mx.eval(value)
    return weights, quant


def _filler(index: int) -> str:
    """A distinct short word for a filler token (byte-level: 'Ġ' is the space)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    word = ""
    n = index
    while True:
        word = letters[n % 26] + word
        n //= 26
        if n == 0:
            break
    return "Ġ" + word


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level tokenizer of exactly ``vocab_size`` tokens (see the module's docstring)."""
    if vocab_size < 260:
        raise ValueError(f"a synthetic tokenizer needs at least 260 tokens, not {vocab_size}")
    byte_tokens = sorted(byte_level_decode_map().items(), key=lambda item: item[1])
    tokens = [ch for ch, _ in byte_tokens]
    fillers = vocab_size - 256 - 2
    tokens += [_filler(i) for i in range(fillers)]
    tokens += ["<|begin_of_text|>", "<|end_of_text|>"]
    types = [1] * (vocab_size - 2) + [3, 3]  # 1 normal, 3 control
    metadata: Mapping[str, object] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": vocab_size - 2,
        "tokenizer.ggml.eos_token_id": vocab_size - 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}"
        ),
    }
    return Tokenizer.from_gguf_metadata(metadata)
