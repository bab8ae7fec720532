"""Models from the Hugging Face hub (``--model org/name``), downloaded into huggingface_hub's own cache.

A node first fetches the small files (config, tokenizer, chat template, generation config and the
safetensors index), then, once it knows its layers, only the safetensors files that hold them (from
``model.safetensors.index.json``). ``huggingface_hub`` resumes an interrupted file, checks what the hub
says of it (size; the ETag of an LFS file is its sha256) and shows a progress bar; ``HF_HUB_OFFLINE=1``
serves from the cache alone. :func:`files_for` is the pure selection.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from exo_stable.modelspec import ModelSpec, UnsupportedModelError

__all__ = ["META_PATTERNS", "fetch_files", "files_for", "is_repo_id", "snapshot_meta"]

META_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
]
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def is_repo_id(text: str) -> bool:
    """``org/name`` that is not a path on this machine."""
    return bool(_REPO.match(text)) and not Path(text).expanduser().exists() and not text.endswith(".gguf")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def snapshot_meta(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory with the model's small files (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=META_PATTERNS, cache_dir=_cache(), local_files_only=_offline()
        )
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache and the hub is offline: {exc}") from exc
    snapshot = Path(path)
    if not (snapshot / "config.json").is_file():
        raise UnsupportedModelError(f"{repo_id} has no config.json (not a model exo-stable can run)")
    return snapshot


def weight_map(snapshot: Path) -> dict[str, str]:
    """Tensor name: file, from the index; a model in one file has no index (its one file holds everything)."""
    index = snapshot / "model.safetensors.index.json"
    if not index.is_file():
        return {}
    data = json.loads(index.read_text())
    mapping = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        raise UnsupportedModelError(f"{index} has no weight_map")
    return {str(k): str(v) for k, v in mapping.items()}


def files_for(spec: ModelSpec, start: int, end: int, mapping: Mapping[str, str]) -> list[str]:
    """The safetensors files holding the tensors of layers ``[start, end)`` and the top-level tensors such a
    stage needs (the embedding on the first stage, the final norm and head on the last: see
    :func:`exo_stable.model.shard_weight_names`), in name order; ``model.safetensors`` when unsharded."""
    from exo_stable.model import LayerRange, shard_weight_names

    if not mapping:
        return ["model.safetensors"]
    layers = LayerRange(start, end, spec.num_hidden_layers)
    wanted = shard_weight_names(spec, layers, list(mapping))
    if not layers.is_first and "lm_head.weight" in mapping:  # an untied head: no embedding after stage 0
        wanted = [n for n in wanted if not n.startswith("model.embed_tokens.")]
    return sorted({mapping[name] for name in wanted})


def fetch_files(repo_id: str, files: Sequence[str], revision: str | None = None) -> list[Path]:
    """Download ``files`` (resuming, checked against the hub's size and hash, with a progress bar) or find them
    in the cache when offline; returns their paths in the snapshot."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    paths = []
    for name in files:
        try:
            got = hf_hub_download(repo_id, name, revision=revision, cache_dir=_cache(), local_files_only=_offline())
        except LocalEntryNotFoundError as exc:
            raise FileNotFoundError(f"{repo_id}/{name} is not in the cache and the hub is offline") from exc
        paths.append(Path(got))
    return paths
