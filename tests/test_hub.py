"""``--model org/name`` from a Hugging Face cache laid out as huggingface_hub lays it out, offline; and each
node's file selection on index files shaped like the hub's (a layer may straddle two files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlx.core as mx
import pytest

from exo_stable.engine.hub import files_for, is_repo_id
from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.synthetic import llama_spec
from exo_stable.engine.synthetic_stream import tokenizer_source_metadata, write_mlx_stream

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo: str, source: Path) -> Path:
    """``models--org--name/{blobs/<sha256>, snapshots/<rev>/<file> -> blob, refs/main}``, as the hub client does."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    return root


@pytest.fixture
def offline_cache(tmp_path: Path, default_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    spec = llama_spec(layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=49152)
    local = write_mlx_stream(tmp_path / "local", spec, tokenizer_source_metadata(default_gguf), shard_bytes=200 << 10)
    root = hub_cache(tmp_path / "hub", "acme/tiny-llama", local)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_repo_id_from_an_offline_cache_loads_only_the_files_of_its_layers(offline_cache: Path, tmp_path: Path) -> None:
    assert is_repo_id("acme/tiny-llama") and not is_repo_id(str(tmp_path))
    source = open_model("acme/tiny-llama")
    assert source.hub == "acme/tiny-llama" and source.spec.num_hidden_layers == 4
    snapshot = offline_cache / "snapshots" / REVISION
    mapping = {n: f.name for n, f in source.files.items()}
    needed = files_for(source.spec, 1, 2, mapping)
    # Take every other weight file out of the cache: the middle stage must not need them.
    for link in snapshot.glob("model-*.safetensors"):
        if link.name not in needed:
            link.resolve().unlink()
            link.unlink()
    shard = source.load_shard(LayerRange(1, 2, 4), Dtype.BFLOAT16)
    local = open_model(tmp_path / "local").load_shard(LayerRange(1, 2, 4), Dtype.BFLOAT16)
    h = mx.random.normal((1, 3, 128)).astype(mx.bfloat16)
    assert mx.array_equal(shard(h, shard.make_cache()), local(h, local.make_cache())).item()
    # A re-plan giving this node the last stage needs files it lacks: offline, that is a clear error.
    with pytest.raises(FileNotFoundError, match="offline"):
        source.load_shard(LayerRange(3, 4, 4), Dtype.BFLOAT16)


def _llama3_8b_like_index() -> dict[str, str]:
    """The shape of a 32-layer model's index in 4 files, where layers 8, 20 and 31 straddle two files."""
    parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    parts += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    mapping = {"model.embed_tokens.weight": "model-00001-of-00004.safetensors"}
    for layer in range(32):
        for i, part in enumerate(parts):
            first_half = i < 4
            if layer < 8 or (layer == 8 and first_half):
                file = 1
            elif layer < 20 or (layer == 20 and first_half):
                file = 2
            elif layer < 31 or (layer == 31 and first_half):
                file = 3
            else:
                file = 4
            mapping[f"model.layers.{layer}.{part}.weight"] = f"model-0000{file}-of-00004.safetensors"
    mapping["model.norm.weight"] = "model-00004-of-00004.safetensors"
    mapping["lm_head.weight"] = "model-00004-of-00004.safetensors"
    return mapping


def test_file_selection_on_a_hub_shaped_index() -> None:
    spec = llama_spec(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
    mapping = _llama3_8b_like_index()
    name = "model-0000{}-of-00004.safetensors".format
    assert files_for(spec, 0, 8, mapping) == [name(1)]
    assert files_for(spec, 8, 16, mapping) == [name(1), name(2)]  # layer 8 straddles files 1 and 2
    assert files_for(spec, 21, 31, mapping) == [name(3)]
    assert files_for(spec, 31, 32, mapping) == [name(3), name(4)]  # untied head: no embedding on the last stage
    assert files_for(spec, 0, 32, mapping) == [name(i) for i in range(1, 5)]
    assert files_for(spec, 0, 32, {}) == ["model.safetensors"]


def test_a_download_that_does_not_hash_to_its_blob_name_is_refused(tmp_path: Path) -> None:
    from exo_stable.engine.hub import check_blob

    good = b"weights"
    blob = tmp_path / hashlib.sha256(good).hexdigest()
    blob.write_bytes(good)
    check_blob(blob)
    bad = tmp_path / hashlib.sha256(b"other").hexdigest()
    bad.write_bytes(good)
    with pytest.raises(OSError, match="hashes to"):
        check_blob(bad)
    assert not bad.exists()


async def test_three_nodes_serve_a_repo_id_from_the_offline_cache(offline_cache: Path) -> None:
    from contextlib import aclosing

    from inproc_cluster import in_process_cluster

    from exo_stable.engine.sampling import SamplingParams
    from exo_stable.pipeline.service import GenerationJob, GenerationResult

    async with in_process_cluster(Path("acme/tiny-llama"), 3, f"hub{os.getpid()}", memory_bytes=1 << 30) as (nodes, _):
        plan = await nodes[0].coordinator.wait_plan_where(lambda p: len(p.stages) == 3, timeout=60)
        assert plan.stages[-1].end == 4
        result = GenerationResult(prompt_tokens=3)
        job = GenerationJob([1, 2, 3], SamplingParams(temperature=0.0), 8)
        async with aclosing(nodes[0].owner.stream(job)) as deltas:
            async for delta in deltas:
                result.add(delta)
        assert len(result.token_ids) == 8
