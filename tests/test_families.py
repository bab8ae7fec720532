"""Every supported mlx-lm family through the generic shard, each a tiny random-weight model built with
mlx-lm's own Model class and written as mlx-lm writes it.

Per family: the whole shard's logits are mlx-lm's own, bit for bit (prefill and decode steps, past a sliding
window where the family has one); every split point with 2 and 3 stages gives the whole model's tokens, greedy
and seeded, with the stages building their decode steps ahead as the stage actors do; and an exact replay after
a restart (new caches on every stage, the prompt and each generated token one step each) continues with the
uninterrupted tokens.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import family_models as fm
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from exo_stable.engine.loader import ModelSource, open_model
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype, UnsupportedModelError
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.stagecompute import StageCompute, prompt_chunks
from exo_stable.engine.wire import tensor_to_bytes

PROMPT = [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198]
STEPS = 10
SAMPLINGS = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=11)}


@pytest.fixture(scope="module", params=fm.FAMILIES)
def family_dir(request: pytest.FixtureRequest, default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fm.write(request.param, tmp_path_factory.mktemp(request.param), default_gguf)


@pytest.mark.parametrize("dtype", [Dtype.FLOAT32, Dtype.BFLOAT16])
def test_whole_shard_logits_are_mlx_lms(family_dir: Path, dtype: Dtype) -> None:
    source = open_model(family_dir)
    n = source.spec.num_hidden_layers
    if dtype is Dtype.BFLOAT16 and source.spec.model_type in ("qwen3_moe", "deepseek_v3"):
        # MLX's CPU backend multiplies gathered experts in float32 only: refused at load, not at the first call.
        for refused in (
            lambda: source.load_shard(LayerRange(0, n, n), dtype),
            lambda: source.check_dtype(dtype, "cpu"),
        ):
            with pytest.raises(UnsupportedModelError, match="MoE expert layers in float32 only"):
                refused()
        source.check_dtype(dtype, "gpu")  # a node serving on a GPU may hold them in bfloat16
        return
    shard = source.load_shard(LayerRange(0, n, n), dtype)
    reference = fm.reference(family_dir, mx.bfloat16 if dtype is Dtype.BFLOAT16 else None)
    ours, theirs = shard.make_cache(), make_prompt_cache(reference)
    x = mx.array([PROMPT], dtype=mx.int32)
    for step in range(6):  # the prompt, then decode steps (past gemma3_text's and mistral's windows)
        a, b = shard(x, ours), reference(x, cache=theirs)
        assert np.array_equal(
            np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a),
            np.array(b.view(mx.uint16) if b.dtype == mx.bfloat16 else b),
        ), f"step {step}"
        x = mx.argmax(a[:, -1:, :], axis=-1).astype(mx.int32)


def _stages(source: ModelSource, sizes: tuple[int, ...]) -> list[StageCompute]:
    n = source.spec.num_hidden_layers
    bounds = [0, *itertools.accumulate(sizes)]
    out = []
    for start, end in itertools.pairwise(bounds):
        sc = StageCompute(source, LayerRange(start, end, n), Dtype.FLOAT32)
        sc.load()
        out.append(sc)
    return out


def _step(stages: list[StageCompute], rid: str, tokens: list[int], position: int) -> int:
    """One step through every stage, activations crossing as exact bytes, as the stage actors run it."""
    wire = None
    for sc in stages:
        out = sc.forward_input(rid, tokens, wire)
        if sc.layers.is_last:
            return sc.pick(rid, out, position)
        wire = tensor_to_bytes(out)
    raise AssertionError("no last stage")


def _generate(
    stages: list[StageCompute], rid: str, params: SamplingParams, *, replay_at: int | None = None
) -> list[int]:
    """The prompt in chunks, then STEPS decode steps, each stage building its next step ahead. ``replay_at``:
    after that many tokens every stage loses its cache (a restart) and the request is replayed exactly."""
    for sc in stages:
        sc.open(rid, params)
    *head, tail = prompt_chunks(PROMPT)
    for chunk in head:
        _step(stages, rid, chunk, 0)
    tokens = [_step(stages, rid, tail, 0)]
    for i in range(STEPS):
        if replay_at == len(tokens):
            for sc in stages:
                sc.close(rid)
                sc.open(rid, params)
            for chunk in prompt_chunks(PROMPT)[:-1]:
                _step(stages, rid, chunk, 0)
            _step(stages, rid, prompt_chunks(PROMPT)[-1], 0)
            for position, token in enumerate(tokens[:-1], start=1):
                _step(stages, rid, [token], position)
        for sc in stages:
            sc.prepare(rid)
        tokens.append(_step(stages, rid, [tokens[-1]], i + 1))
    for sc in stages:
        sc.close(rid)
    return tokens


def _splits(n: int, stages: int) -> list[tuple[int, ...]]:
    return [
        tuple(b - a for a, b in itertools.pairwise((0, *cuts, n)))
        for cuts in itertools.combinations(range(1, n), stages - 1)
    ]


def test_every_split_point_gives_the_whole_models_tokens(family_dir: Path) -> None:
    source = open_model(family_dir)
    n = source.spec.num_hidden_layers
    whole = _stages(source, (n,))
    expected = {name: _generate(whole, name, params) for name, params in SAMPLINGS.items()}
    assert all(len(set(ids)) > 3 for ids in expected.values()), f"degenerate reference {expected}"
    for sizes in _splits(n, 2) + _splits(n, 3):
        stages = _stages(source, sizes)
        for name, params in SAMPLINGS.items():
            assert _generate(stages, name, params) == expected[name], f"split {sizes}, {name}"
        assert all(sc.stats.prepared_used >= STEPS for sc in stages), "decode steps were built ahead"
    # A restart mid-answer: caches rebuilt by exact replay continue with the same tokens.
    stages = _stages(source, (1, 2, 1))
    for name, params in SAMPLINGS.items():
        assert _generate(stages, name, params, replay_at=6) == expected[name], f"replay, {name}"


# One family per kind of quantized module: stacked experts, latent-attention multi-linears, fused projections,
# biases with a tied (quantized) embedding head, sliding windows. (All eleven pass; five keep CI lean.)
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "phi3", "qwen2", "gemma3_text"])
def test_quantized_sharded_directories_split_as_mlx_lm_loads_them(
    family: str, default_gguf: Path, tmp_path: Path
) -> None:
    # mlx-lm's mixed recipe: 4-bit groups, the second layer's MLP in 8 bits, one projection left in float;
    # written in two model-0000N-of-00002 files with the index. Kept quantized, a split gives mlx-lm's logits.
    path = fm.write(family, tmp_path / "q", default_gguf, quantize=True, shards=2)
    assert sorted(p.name for p in path.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    source = open_model(path)
    assert {q.bits for q in source.quant.values()} == {4, 8}
    assert "model.layers.1.self_attn.o_proj" not in source.quant
    n = source.spec.num_hidden_layers
    x = mx.array([PROMPT], dtype=mx.int32)
    reference = fm.reference(path)
    expected = np.array(reference(x, cache=make_prompt_cache(reference)))
    first, last = (source.load_shard(LayerRange(a, b, n), Dtype.QUANTIZED) for a, b in ((0, 1), (1, n)))
    assert np.array_equal(np.array(last(first(x, first.make_cache()), last.make_cache())), expected)
    dequantized = source.load_shard(LayerRange(0, n, n), Dtype.FLOAT32)
    assert np.abs(np.array(dequantized(x, dequantized.make_cache())) - expected).max() < 1e-3


def test_a_forward_call_starts_the_device_every_few_layers(
    default_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU the shard starts the layers built so far every OVERLAP_LAYERS layers (the family's own loop runs
    # them): counted here on the CPU with a period of 1, for the shard's own layers only, never after the last.
    import exo_stable.engine.model as model_module

    path = fm.write("gemma3_text", tmp_path / "g", default_gguf)
    source = open_model(path)
    n = source.spec.num_hidden_layers
    shard = source.load_shard(LayerRange(1, 3, n), Dtype.FLOAT32)
    started: list[tuple[int, ...]] = []
    monkeypatch.setattr(model_module, "_overlap_every", lambda: 1)
    monkeypatch.setattr(model_module.mx, "async_eval", lambda *a: started.append(tuple(a[0].shape)))
    h = mx.ones((1, 3, source.spec.hidden_size))
    overlapped = shard(h, shard.make_cache())
    assert started == [(1, 3, source.spec.hidden_size)]  # after layer 1, not after layer 2 (the last)
    monkeypatch.undo()
    assert np.array_equal(np.array(overlapped), np.array(shard(h, shard.make_cache(), overlap=False)))


def test_unsupported_families_are_refused_with_the_reason(tmp_path: Path) -> None:
    cases = {
        "gemma3n": "per-layer inputs",
        "mamba": "recurrent state",
        "gpt2": "not among the families tested",
        "no_such_family": "mlx-lm has no model class",
    }
    for model_type, reason in cases.items():
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
        with pytest.raises(UnsupportedModelError, match=rf"'{model_type}' is not supported: .*{reason}"):
            open_model(d)


def test_rewinds_and_undone_steps_leave_the_caches_exact(family_dir: Path) -> None:
    # A spot check recomputes a step after rewinding it; a step built ahead is undone when a replay brings
    # several tokens at once. Past a sliding window (gemma3_text, mistral) both must restore what the rotating
    # cache overwrote, so the logits stay those of a run that did neither.
    source = open_model(family_dir)
    n = source.spec.num_hidden_layers
    (sc,) = _stages(source, (n,))
    feed = [[t] for t in (563, 260, 3426, 30, 2, 198, 1, 520)] + [[9531, 198], [19161, 253]]

    def run(rid: str, *, disturb: bool) -> list[bytes]:
        sc.open(rid, SamplingParams())
        out = [np.array(sc.forward_input(rid, PROMPT)).tobytes()]
        for tokens in feed:
            if disturb:
                sc.prepare(rid)  # undone below when two tokens come
            logits = sc.forward_input(rid, tokens)
            if disturb:
                sc.prepare(rid)  # the next step built ahead, then a spot check of this one: both are undone
                sc.rewind(rid, len(tokens))  # the spot check: the same call again on the same cache state
                again = sc.forward_input(rid, tokens)
                assert np.array_equal(np.array(again), np.array(logits))
            out.append(np.array(logits).tobytes())
        sc.close(rid)
        return out

    assert run("disturbed", disturb=True) == run("plain", disturb=False)


@pytest.mark.parametrize("family", sorted(fm.GGUF_ARCHITECTURES))
def test_gguf_files_run_as_mlx_lms_model(family: str, default_gguf: Path, tmp_path: Path) -> None:
    # Written as llama.cpp's converter names and lays out tensors (gguf's own name map), read back into mlx-lm's
    # names and configuration: the same logits as mlx-lm's model of those weights, whole and split.
    path, reference = fm.write_gguf(family, tmp_path / f"{family}.gguf", default_gguf)
    source = open_model(path)
    assert source.format == "gguf" and source.spec.model_type == fm.config_for(family)["model_type"]
    n = source.spec.num_hidden_layers
    x = mx.array([PROMPT], dtype=mx.int32)
    expected = np.array(reference(x, cache=make_prompt_cache(reference)))
    whole = source.load_shard(LayerRange(0, n, n), Dtype.FLOAT32)
    got = np.array(whole(x, whole.make_cache()))
    if family == "llama":
        # Llama's permuted q/k run with the traditional rotary layout: the same values, summed in another order.
        assert np.abs(got - expected).max() < 1e-4
    else:
        assert np.array_equal(got, expected)
    first, last = (source.load_shard(LayerRange(a, b, n), Dtype.FLOAT32) for a, b in ((0, 2), (2, n)))
    assert np.array_equal(np.array(last(first(x, first.make_cache()), last.make_cache())), got)


def test_quantized_gguf_moe_splits_exactly(default_gguf: Path, tmp_path: Path) -> None:
    # Q4_0 attention and Q8_0 MoE experts (3-D blocks), kept quantized: any split is the whole model's bits,
    # and the dequantized model stays close to mlx-lm's float one.
    path, reference = fm.write_gguf("qwen3_moe", tmp_path / "q.gguf", default_gguf, quantize=True)
    source = open_model(path)
    assert {q.bits for q in source.quant.values()} == {4, 8}
    assert any("switch_mlp" in module for module in source.quant)
    n = source.spec.num_hidden_layers
    x = mx.array([PROMPT], dtype=mx.int32)
    whole = source.load_shard(LayerRange(0, n, n), Dtype.QUANTIZED)
    got = np.array(whole(x, whole.make_cache()))
    first, last = (source.load_shard(LayerRange(a, b, n), Dtype.QUANTIZED) for a, b in ((0, 3), (3, n)))
    assert np.array_equal(np.array(last(first(x, first.make_cache()), last.make_cache())), got)
    expected = np.array(reference(x, cache=make_prompt_cache(reference)))
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.6


def test_hugging_face_layout_is_sanitized_per_shard(default_gguf: Path, tmp_path: Path) -> None:
    # A transformers checkpoint keeps each expert's matrices apart (mlx-lm's sanitize stacks them) and is
    # sharded with an index: each stage sanitizes only its own layers' tensors, with mlx-lm's logits.
    mlx_dir = fm.write("qwen3_moe", tmp_path / "mlx", default_gguf)
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (hf / name).write_bytes((mlx_dir / name).read_bytes())
    loaded = mx.load(str(mlx_dir / "model.safetensors"))
    assert isinstance(loaded, dict)
    weights: dict[str, mx.array] = {}
    for name, value in loaded.items():
        if ".switch_mlp." in name:
            for e in range(value.shape[0]):
                weights[name.replace(".switch_mlp.", f".experts.{e}.")] = value[e]
        else:
            weights[name] = value
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        mx.save_safetensors(str(hf / file), {k: weights[k] for k in part})
    index = {"weight_map": {k: file for file, part in halves.items() for k in part}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    x = mx.array([PROMPT], dtype=mx.int32)
    reference = fm.reference(mlx_dir)
    expected = np.array(reference(x, cache=make_prompt_cache(reference)))
    source = open_model(hf)
    n = source.spec.num_hidden_layers
    first, last = (source.load_shard(LayerRange(a, b, n), Dtype.FLOAT32) for a, b in ((0, 2), (2, n)))
    assert np.array_equal(np.array(last(first(x, first.make_cache()), last.make_cache())), expected)
