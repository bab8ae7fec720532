"""Shard-only reading: GGUF tensors read one at a time equal mlx's whole-file decoding bit for bit, the
fingerprint comes from headers, and a shard reads only its own tensors (GGUF bytes, safetensors files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from exo_stable.engine import gguf_file
from exo_stable.engine.gguf import read_gguf
from exo_stable.engine.gguf_file import open_gguf, read_tensors
from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.synthetic import llama_spec
from exo_stable.engine.synthetic_stream import (
    tokenizer_source_metadata,
    write_gguf_stream,
    write_mlx_stream,
)


def _same(a: dict[str, mx.array], b: dict[str, mx.array]) -> list[str]:
    assert set(a) == set(b)
    return [
        k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not mx.array_equal(a[k], b[k]).item()
    ]


def test_default_gguf_per_tensor_equals_mx_load(default_gguf: Path) -> None:
    index = open_gguf(default_gguf)
    _, whole, metadata = read_gguf(default_gguf)
    assert _same(read_tensors(index, index.names()), whole) == []
    assert set(index.metadata) == set(metadata)
    assert {q.bits for q in index.quant().values()} == {4, 8}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("small")
    tok = tokenizer_source_metadata(default_gguf)
    spec = llama_spec(layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=49152)
    return {
        "Q4_0": write_gguf_stream(d / "q4.gguf", spec, tok, kind="Q4_0"),
        "Q8_0": write_gguf_stream(d / "q8.gguf", spec, tok, kind="Q8_0"),
        "mlx": write_mlx_stream(d / "mlx", spec, tok, shard_bytes=200 << 10),
    }


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_q4_0_and_q8_0_per_tensor_equal_mx_load(small: dict[str, Any], kind: str) -> None:
    index = open_gguf(small[kind])
    assert _same(read_tensors(index, index.names()), read_gguf(small[kind])[1]) == []


def test_fingerprint_reads_no_weight(small: dict[str, Any], tmp_path: Path) -> None:
    original = open_model(small["Q8_0"])
    copy = tmp_path / "copy.gguf"
    data = bytearray(small["Q8_0"].read_bytes())
    tensor = next(iter(original.gguf.tensors.values()))  # type: ignore[union-attr]
    last = max(original.gguf.tensors.values(), key=lambda t: t.offset)  # type: ignore[union-attr]
    data[last.offset : last.offset + last.n_bytes] = bytes(last.n_bytes)  # other weights, same headers
    copy.write_bytes(bytes(data))
    assert open_model(copy).fingerprint == original.fingerprint
    assert tensor.offset >= original.gguf.data_start  # type: ignore[union-attr]


def test_gguf_shard_reads_only_its_tensors(small: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    source = open_model(small["Q4_0"])
    assert source.gguf is not None
    read: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        read.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(gguf_file.os, "pread", counting)
    shard = source.load_shard(LayerRange(1, 3, 4), Dtype.QUANTIZED)
    layer_bytes = sum(t.n_bytes for t in source.gguf.tensors.values() if ".layers.1." in t.name)
    assert sum(read) == 2 * layer_bytes  # two layers; no embedding, norm or head on a middle stage
    assert shard.range == LayerRange(1, 3, 4)


def test_safetensors_shard_opens_only_its_files(small: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    source = open_model(small["mlx"])
    opened: list[str] = []
    real = mx.load

    def recording(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mx, "load", recording)
    source.load_shard(LayerRange(1, 2, 4), Dtype.BFLOAT16)
    holders = {source.files[n].name for n in source.files if ".layers.1." in n}
    assert set(opened) == holders
    assert len(set(source.files.values())) > len(holders)
