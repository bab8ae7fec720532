"""Models from the Hugging Face hub (``--model org/name``), downloaded into huggingface_hub's own cache.

A node first fetches the small files (config, tokenizer, chat template, generation config and the
safetensors index), then, once it knows its layers, only the safetensors files that hold them (from
``model.safetensors.index.json``). ``huggingface_hub`` resumes an interrupted file, checks what the hub
says of it (size; the ETag of an LFS file is its sha256) and shows a progress bar; ``HF_HUB_OFFLINE=1``
serves from the cache alone. :func:`files_for` is the pure selection.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from exo_stable import settings
from exo_stable.engine.modelspec import ModelSpec, UnsupportedModelError

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
    return settings.HF_HUB_OFFLINE.get().strip().lower() in ("1", "true", "yes", "on")


def _cache() -> str | None:
    return settings.HF_HUB_CACHE.get() or None


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
    :func:`exo_stable.engine.model.shard_weight_names`), in name order; ``model.safetensors`` when unsharded."""
    from exo_stable.engine.model import LayerRange, shard_weight_names

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
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    paths = []
    for name in files:
        cached = try_to_load_from_cache(repo_id, name, cache_dir=_cache(), revision=revision)
        try:
            got = Path(
                hf_hub_download(repo_id, name, revision=revision, cache_dir=_cache(), local_files_only=_offline())
            )
        except LocalEntryNotFoundError as exc:
            raise FileNotFoundError(f"{repo_id}/{name} is not in the cache and the hub is offline") from exc
        if not isinstance(cached, str):
            check_blob(got)  # downloaded just now
        paths.append(got)
    return paths


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_blob(path: Path) -> None:
    """An LFS file's blob is named by the sha256 the hub gives (its ETag): the content must hash to it."""
    blob = path.resolve()
    if not _SHA256.match(blob.name):
        return  # a small git file: its ETag is a git hash; huggingface_hub checked its size
    digest = hashlib.sha256()
    with blob.open("rb") as fh:
        while chunk := fh.read(16 << 20):
            digest.update(chunk)
    if digest.hexdigest() != blob.name:
        blob.unlink()
        raise OSError(f"{path.name}: the download hashes to {digest.hexdigest()}, the hub says {blob.name}; removed")
