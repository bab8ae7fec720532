"""What the GPU support adds, checked on the CPU: random published shapes, device choice, ``--gpu``, the
one-step-ahead decode, and the GPU benchmark itself (its tiny CPU run uses real node processes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from exo_stable.engine import device, random_model
from exo_stable.engine.gguf import UnsupportedModelError
from exo_stable.engine.loader import open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.platform import gpu_index, reexec_env
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.single import SingleDeviceEngine

ROOT = Path(__file__).resolve().parents[1]


def test_published_shapes_have_their_parameter_counts() -> None:
    def params(name: str) -> float:
        shapes = random_model.tensor_shapes(random_model.SHAPES[name]).values()
        return sum(math.prod(shape) for shape in shapes)

    assert params("llama-3-8b") / 1e9 == pytest.approx(8.03, abs=0.01)
    assert params("llama-3-70b") / 1e9 == pytest.approx(70.55, abs=0.01)
    assert params("llama-3.2-1b") / 1e9 == pytest.approx(1.24, abs=0.01)


def test_random_names_are_parsed_and_errors_are_clear() -> None:
    assert random_model.parse("random:tiny").seed == 0
    assert random_model.parse("random:llama-3-8b@7").seed == 7
    with pytest.raises(UnsupportedModelError, match=r"known: .*llama-3-8b"):
        open_model("random:llama-9")
    with pytest.raises(UnsupportedModelError, match="not an integer"):
        open_model("random:tiny@x")
    a, b, c = open_model("random:tiny"), open_model("random:tiny"), open_model("random:tiny@1")
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_each_tensor_depends_only_on_seed_and_name() -> None:
    model = random_model.parse("random:tiny@3")
    names = list(random_model.tensor_shapes(model.spec))
    whole, _ = random_model.generate(model, names, dtype=mx.float32)
    part, _ = random_model.generate(model, names[5:9], dtype=mx.float32)
    assert all(mx.array_equal(part[n], whole[n]).item() for n in names[5:9])
    other, _ = random_model.generate(random_model.parse("random:tiny@4"), names[5:6], dtype=mx.float32)
    assert not mx.array_equal(other[names[5]], whole[names[5]]).item()
    with pytest.raises(KeyError):
        random_model.generate(model, ["model.layers.99.mlp.up_proj.weight"])


@pytest.mark.parametrize("dtype", [Dtype.FLOAT32, Dtype.BFLOAT16, Dtype.QUANTIZED])
def test_split_shards_of_a_random_model_equal_the_whole(dtype: Dtype) -> None:
    source = open_model("random:tiny@2")
    whole = source.load_shard(LayerRange(0, 4, 4), dtype)
    first, last = source.load_shard(LayerRange(0, 1, 4), dtype), source.load_shard(LayerRange(1, 4, 4), dtype)
    x = mx.array([[5, 17, 300, 2, 9]])
    expected = whole(x, whole.make_cache())
    got = last(first(x, first.make_cache()), last.make_cache())
    assert mx.array_equal(expected, got).item()
    assert np.array(expected[0, -1].astype(mx.float32)).std() > 0.5  # logits vary: the check can fail


def test_synthetic_tokenizer_round_trips_text() -> None:
    tok = random_model.synthetic_tokenizer(128256)
    assert tok.vocab_size == 128256 and tok.eos_id == 128255 and tok.bos_id == 128254
    text = "héllo wörld, naïve café 🎉"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([400]).startswith(" ")  # a filler decodes to a word


async def test_one_step_ahead_decode_gives_the_synchronous_tokens() -> None:
    source = open_model("random:tiny@5")
    prompt = source.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    results = []
    for lookahead in (False, True):
        engine = SingleDeviceEngine(source, dtype=Dtype.FLOAT32, lookahead=lookahead)
        await engine.start()
        try:
            results.append([t async for t in engine.generate(prompt, SamplingParams(temperature=0.0), 40)])
            stream = engine.generate(prompt, SamplingParams(temperature=0.0), 40)
            first_five: list[int] = []
            async for token in stream:
                first_five.append(token)
                if len(first_five) == 5:
                    break
            await stream.aclose()  # stopping early drops the step already queued
            assert engine.open_requests == 0 or await _closed(engine)
            assert first_five == results[-1][:5]
        finally:
            engine.close()
    assert len(results[0]) == 40
    assert results[0] == results[1]
    assert len(set(results[0])) >= 2  # the tokens move: a path that repeated its input would show


async def _closed(engine: SingleDeviceEngine) -> bool:
    """True once the engine's MLX thread has run the close queued behind the stopped request."""
    return await engine._thread.run(lambda: engine.open_requests == 0, timeout=10)


def test_gpu_flag_sets_cuda_visible_devices_once() -> None:
    assert gpu_index(["serve", "--gpu", "1"]) == 1
    assert gpu_index(["serve", "--gpu=3"]) == 3
    assert gpu_index(["serve", "--gpu"]) is None
    assert gpu_index(["serve", "--gpu", "x"]) is None
    env = reexec_env(["serve", "--gpu", "1"], {"EXO_STABLE_BLAS": "reference"})
    assert env is not None and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert reexec_env(["serve", "--gpu", "1"], env) is None  # the restarted process does not restart again
    assert reexec_env(["serve"], {"EXO_STABLE_BLAS": "reference"}) is None


def test_device_choice() -> None:
    if device.gpu_backend() is None:
        assert device.resolve(None) is device.DeviceKind.CPU
        with pytest.raises(device.DeviceUnavailable, match="exo-stable\\[cuda\\]"):
            device.resolve("gpu")
    assert device.resolve("cpu") is device.DeviceKind.CPU
    assert device.describe(device.DeviceKind.CPU) == "cpu"
    # cuDNN attention is not bit-repeatable on CUDA; importing exo_stable turns it off unless a user chose.
    assert os.environ.get("MLX_CUDA_USE_CUDNN_SDPA") == "0"


def test_gpu_benchmark_runs_its_whole_path_on_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "benchmarks/bench_gpu.py", "--shape", "tiny", "--device", "cpu", "--prompt-tokens", "60"]
    cmd += ["--decode-tokens", "12", "--repeats", "1", "--streams", "1", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for row in report["single_device"].values():
        assert row["exo_stable_repeatable"] is True
        assert row["exo_stable"]["decode_tok_s"] > 0 and row["mlx_lm"]["decode_tok_s"] > 0
    layouts = [(n["layout"], n["split"]) for n in report["nodes"]]
    assert layouts == [("one", [4]), ("one-sync", [4]), ("split", [2, 2]), ("split-no-build-ahead", [2, 2])]
    # Every stream compared: each split's 1 single + 1 + 3 concurrent, and the waiting node's single one.
    assert report["split_identical"] is True and report["split_answers_compared"] == 1 + 1 + 3 + 1 + (1 + 1 + 3)
    assert report["build_ahead_gain"] > 0
    assert "split / single decode ratio" in proc.stdout
    for row in report["nodes"]:  # the trace of a stream says where its decode steps went, stage by stage
        b = row["breakdown"]
        assert b["steps"] >= 2 and len(b["stages"]) == len(row["split"]) == len(b["wire_ms"])
        assert all(st["compute_ms"] > 0 and st["handoff_ms"] >= 0 for st in b["stages"])
        assert b["step_ms"] >= sum(st["compute_ms"] for st in b["stages"])


def test_step_parts_benchmark_runs_on_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "parts.json"
    cmd = [sys.executable, "benchmarks/gpu_step_parts.py", "--shape", "tiny", "--device", "cpu", "--steps", "5"]
    cmd += ["--rounds", "2", "--prompt-tokens", "40", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # Every variant (whole model with and without overlap, the split built when the input comes and ahead)
    # gave the whole model's tokens in both rounds.
    assert report["identical"] is True and report["different"] == []
    assert set(report["medians_ms"]) == {"whole", "whole_no_overlap", "split", "split_built_ahead"}
    built = report["medians_ms"]["split_built_ahead"]
    assert built["ahead_ms"] > 0 and report["medians_ms"]["split"]["ahead_ms"] == 0
    assert all(v > 0 for k, v in built.items())
