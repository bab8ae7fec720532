"""Find a model on disk, say what it is, and load any layer range of it.

Two formats are accepted: a GGUF file (the default model is one) and an MLX / Hugging Face model directory
(``config.json`` + ``*.safetensors``, sharded with an index or not, + tokenizer files), of any family
:mod:`exo_stable.engine.family` supports. A third source needs
no file: ``random:<shape>[@seed]`` is a published llama shape with seeded random weights, each shard
generating only its own tensors (see :mod:`exo_stable.engine.random_model`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx

from exo_stable.engine import random_model
from exo_stable.engine.family import check_supported
from exo_stable.engine.gguf import spec_from_metadata
from exo_stable.engine.gguf_file import GGUFIndex, open_gguf, read_tensors
from exo_stable.engine.model import (
    LayerRange,
    ShardModel,
    build_shard,
    kept_weights,
    refuse_half_experts_on_cpu,
    shard_weight_names,
)
from exo_stable.engine.modelspec import Dtype, ModelFootprint, ModelSpec, QuantSpec, UnsupportedModelError
from exo_stable.tokenizer import Tokenizer

__all__ = ["ModelSource", "UnsupportedModelError", "open_model"]


@dataclass
class ModelSource:
    """A model on disk: its spec, tokenizer, fingerprint, and a way to build any shard of it."""

    path: Path
    format: Literal["gguf", "mlx", "random"]
    name: str
    spec: ModelSpec
    tokenizer: Tokenizer
    fingerprint: str
    quant: dict[str, QuantSpec]
    random: random_model.RandomModel | None = None
    gguf: GGUFIndex | None = field(default=None, repr=False)
    files: dict[str, Path] = field(default_factory=dict, repr=False)
    """Safetensors models: the file holding each tensor (from the headers, or a hub model's index)."""
    hub: str | None = None
    """A Hugging Face repo id: weight files are downloaded when a shard needs them (see :mod:`.hub`)."""

    def _absent(self) -> list[Path]:
        return sorted({f for f in self.files.values() if not f.is_file()})

    def tensor_table(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every tensor's shape and dtype name, from headers alone (a random model's as drawn in bfloat16)."""
        if self.gguf is not None:
            return self.gguf.table()
        if self.random is not None or self._absent():
            # Not every header is on this node yet (a hub model's other files): the published llama shapes.
            return {n: (s, "bfloat16") for n, s in random_model.tensor_shapes(self.spec).items()}
        table: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.files.values())):
            table.update(safetensors_table(file))
        return {n: v for n, v in table.items() if n in self.files}

    def footprint(self, dtype: Dtype, *, kv_tokens: int) -> ModelFootprint:
        """What the model costs served in ``dtype`` with a KV reserve of ``kv_tokens`` tokens per layer."""
        from exo_stable.engine.footprint import footprint_from_tensors
        from exo_stable.engine.model import compute_dtype

        act = compute_dtype(dtype).size
        return footprint_from_tensors(
            self.spec, self.tensor_table(), self.quant, dtype, act_bytes=act, kv_tokens=kv_tokens
        )

    def tensor_names(self) -> list[str]:
        """Every tensor name of the model (mlx-lm naming), from headers alone."""
        if self.random is not None:
            return list(random_model.tensor_shapes(self.spec))
        if self.gguf is not None:
            return self.gguf.names()
        return list(self.files)

    def read_tensors(self, names: list[str]) -> dict[str, mx.array]:
        """Only the tensors ``names``: GGUF tensors are read and converted one at a time, safetensors files
        holding none of them are not opened, and the others are loaded lazily (MLX reads a tensor when it is
        evaluated). Call on the MLX thread."""
        if self.gguf is not None:
            return read_tensors(self.gguf, names)
        if self.hub is not None:
            from exo_stable.engine.hub import fetch_files

            needed = sorted({self.files[n].name for n in names})
            fetch_files(self.hub, needed, revision=self.path.name)
        if self.random is not None:
            return random_model.generate(self.random, names)[0]
        out: dict[str, mx.array] = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, wanted in by_file.items():
            loaded = mx.load(str(file))
            assert isinstance(loaded, dict)
            out.update({n: loaded[n] for n in wanted})
        return out

    def weights(self) -> dict[str, mx.array]:
        """The whole model's tensors (for tools and tests; a stage reads only its own)."""
        return self.read_tensors(self.tensor_names())

    def load_shard(self, layers: LayerRange, dtype: Dtype, *, keep: ShardModel | None = None) -> ShardModel:
        """Build layers ``layers`` (embedding/head included where they belong). Call on the MLX thread.

        ``keep``: a shard this node built earlier of this model in ``dtype``: the layers and top-level modules
        it holds are taken over as built, and only the tensors of the others are read (a re-plan that moves
        a stage's boundary builds only the layers it gains)."""
        if layers.total != self.spec.num_hidden_layers:
            raise ValueError(f"{self.name} has {self.spec.num_hidden_layers} layers, not {layers.total}")
        kept = None if keep is None or keep.spec != self.spec else kept_weights(keep, layers)
        if self.random is not None:
            # Only this shard's tensors are drawn; the whole model never exists on this node.
            names = shard_weight_names(self.spec, layers, list(random_model.tensor_shapes(self.spec)))
            names = [n for n in names if kept is None or not kept.covers(n)]
            draw = mx.float32 if dtype is Dtype.FLOAT32 else mx.float16 if dtype is Dtype.FLOAT16 else mx.bfloat16
            weights, quant = random_model.generate(self.random, names, dtype=draw, quantize=dtype is Dtype.QUANTIZED)
            return build_shard(self.spec, layers, weights, quant, dtype, kept=kept)
        names = _untied(shard_weight_names(self.spec, layers, self.tensor_names()), layers)
        names = [n for n in names if kept is None or not kept.covers(n)]
        shard = build_shard(self.spec, layers, self.read_tensors(names), self.quant, dtype, kept=kept)
        mx.clear_cache()  # the buffers of raw tensors that were converted go back to the system
        return shard

    def check_dtype(self, dtype: Dtype, device: str) -> None:
        """Refuse at start a dtype this model cannot run in on ``device`` ("cpu" or "gpu")."""
        if device == "cpu":
            refuse_half_experts_on_cpu(self.spec, dtype)

    def release_weights(self) -> None:
        """Nothing is kept between loads any more: each shard reads its own tensors."""


def open_model(path: Path | str) -> ModelSource:
    """Identify the model at ``path``; a clear error names what was found when it is not usable."""
    if random_model.is_random(str(path)):
        return _open_random(str(path))
    from exo_stable.engine import hub

    if hub.is_repo_id(str(path)):
        return _open_hub(str(path))
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnsupportedModelError(f"{path} is a file but not a .gguf model")
        return _open_gguf(path)
    if (path / "config.json").is_file():
        return _open_mlx_dir(path)
    found = sorted(p.name for p in path.iterdir())[:12]
    raise UnsupportedModelError(
        f"{path} is a directory without config.json (found: {', '.join(found) or 'nothing'}); "
        "expected a GGUF file or an MLX/Hugging Face model directory"
    )


def _open_gguf(path: Path) -> ModelSource:
    index = open_gguf(path)  # metadata and tensor headers; no weight is read
    spec = spec_from_metadata(index.metadata, tied="lm_head.weight" not in index.tensors)
    tokenizer = Tokenizer.from_gguf_metadata(index.metadata)
    digest = hashlib.sha256(index.header_digest().encode())
    digest.update(tokenizer.fingerprint().encode())
    return ModelSource(
        path=path,
        format="gguf",
        name=path.stem,
        spec=spec,
        tokenizer=tokenizer,
        fingerprint=digest.hexdigest()[:32],
        quant=index.quant(),
        gguf=index,
    )


def _open_random(name: str) -> ModelSource:
    try:
        model = random_model.parse(name)
    except ValueError as exc:
        raise UnsupportedModelError(str(exc)) from None
    tokenizer = random_model.synthetic_tokenizer(model.spec.vocab_size)
    return ModelSource(
        path=Path(name),
        format="random",
        name=model.name,
        spec=model.spec,
        tokenizer=tokenizer,
        fingerprint=model.fingerprint(tokenizer),
        quant={},
        random=model,
    )


def spec_from_config(config: dict[str, Any]) -> ModelSpec:
    """A model's spec from its config.json (any supported family; refused with the reason otherwise)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedModelError("config.json has no model_type")
    check_supported(model_type)
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return ModelSpec(
            hidden_size=hidden,
            num_hidden_layers=int(config["num_hidden_layers"]),
            intermediate_size=int(config.get("intermediate_size") or config.get("moe_intermediate_size") or 0),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            rms_norm_eps=float(config.get("rms_norm_eps") or config.get("norm_epsilon") or 1e-5),
            vocab_size=int(config["vocab_size"]),
            head_dim=config.get("head_dim"),
            rope_theta=float(config.get("rope_theta") or 10000.0),
            rope_traditional=bool(config.get("rope_traditional", False)),
            rope_scaling=config.get("rope_scaling"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            context_length=int(config.get("max_position_embeddings") or 2048),
            model_type=model_type,
            config=config,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"config.json of model_type {model_type!r} lacks or garbles {exc}") from None


def weight_files(path: Path) -> list[Path]:
    """A directory's safetensors files: those its index names (sharded ``model-0000N-of-0000M``), else all."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UnsupportedModelError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UnsupportedModelError(f"{path} lacks {', '.join(absent)} (named by {index.name})")
        return files
    return sorted(path.glob("*.safetensors"))


def _safetensors_header(file: Path) -> dict[str, Any]:
    with file.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= 100 << 20:
            raise UnsupportedModelError(f"{file} is not a safetensors file")
        header = json.loads(fh.read(size))
    if not isinstance(header, dict):
        raise UnsupportedModelError(f"{file} has no safetensors header")
    header.pop("__metadata__", None)
    return header


def safetensors_names(file: Path) -> list[str]:
    """Tensor names from a safetensors header alone (no tensor is read)."""
    return list(_safetensors_header(file))


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "I32": "int32", "U8": "uint8"}


def safetensors_table(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and MLX dtype name from a safetensors header."""
    return {
        name: (tuple(int(d) for d in info["shape"]), _ST_DTYPES.get(info["dtype"], info["dtype"].lower()))
        for name, info in _safetensors_header(file).items()
    }


def quant_from_config(config: dict[str, Any], names: list[str]) -> dict[str, QuantSpec]:
    """Per-module quantization as mlx-lm writes it: a default in ``quantization`` and per-module overrides
    (a dict of group size and bits, or false) under the module's path; a module is quantized where the file
    has its ``scales``."""
    cfg = config.get("quantization") or config.get("quantization_config")
    scaled = [n.removesuffix(".scales") for n in names if n.endswith(".scales")]
    if not cfg:
        if scaled:
            raise UnsupportedModelError(f"weights have quantization scales ({scaled[0]}) but config.json says none")
        return {}
    if not isinstance(cfg, dict) or cfg.get("mode", "affine") != "affine" or "bits" not in cfg:
        raise UnsupportedModelError(
            f"quantization {cfg!r} is not supported (supported: MLX affine quantization with group_size and bits)"
        )
    default = QuantSpec(bits=int(cfg["bits"]), group_size=int(cfg["group_size"]))
    out: dict[str, QuantSpec] = {}
    for module in scaled:
        override = cfg.get(module)
        if override is False:
            raise UnsupportedModelError(f"{module} has quantization scales but config.json says it is not quantized")
        if isinstance(override, dict):
            if override.get("mode", "affine") != "affine":
                raise UnsupportedModelError(f"{module}: quantization mode {override['mode']!r} is not supported")
            out[module] = QuantSpec(bits=int(override["bits"]), group_size=int(override["group_size"]))
        else:
            out[module] = default
    return out


def _open_mlx_dir(path: Path) -> ModelSource:
    config = _config(path, path.name)
    spec = spec_from_config(config)  # an unsupported family is named before anything else is looked at
    files = weight_files(path)
    if not files:
        raise UnsupportedModelError(f"{path} has config.json but no *.safetensors weights")
    holder = {n: f for f in files for n in safetensors_names(f) if "rotary_emb.inv_freq" not in n}
    sizes = "".join(f"{f.name}:{f.stat().st_size};" for f in files)
    return _mlx_source(path, path.name, config, spec, files=holder, weights=sizes)


def _open_hub(repo_id: str) -> ModelSource:
    """A hub model: its small files now, each shard's weight files when the shard is loaded."""
    from exo_stable.engine import hub

    snapshot = hub.snapshot_meta(repo_id)
    mapping = hub.weight_map(snapshot)
    if not mapping:
        hub.fetch_files(repo_id, ["model.safetensors"], revision=snapshot.name)
        source = _open_mlx_dir(snapshot)
        source.name = repo_id
        return source
    config = _config(snapshot, repo_id)
    files = {n: snapshot / mapping[n] for n in mapping if "rotary_emb.inv_freq" not in n}
    weights = json.dumps(mapping, sort_keys=True)
    return _mlx_source(snapshot, repo_id, config, spec_from_config(config), files=files, weights=weights, hub=repo_id)


def _config(root: Path, name: str) -> dict[str, Any]:
    config = json.loads((root / "config.json").read_text())
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{name}: config.json is not a JSON object")
    return config


def _mlx_source(
    root: Path,
    name: str,
    config: dict[str, Any],
    spec: ModelSpec,
    *,
    files: dict[str, Path],
    weights: str,
    hub: str | None = None,
) -> ModelSource:
    """An MLX / Hugging Face model from its config, its directory's tokenizer and where each tensor is;
    ``weights`` describes the weight files for the fingerprint (their sizes, or the hub's weight map)."""
    tokenizer = Tokenizer.from_hf_dir(root)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(weights.encode())
    digest.update(tokenizer.fingerprint().encode())
    return ModelSource(
        path=root,
        format="mlx",
        name=name,
        spec=spec,
        tokenizer=tokenizer,
        fingerprint=digest.hexdigest()[:32],
        quant=quant_from_config(config, list(files)),
        files=files,
        hub=hub,
    )


def _untied(names: list[str], layers: LayerRange) -> list[str]:
    """A stage after the first needs no embedding when the model has its own head."""
    if layers.is_first or "lm_head.weight" not in names:
        return names
    return [n for n in names if not n.startswith("model.embed_tokens.")]
