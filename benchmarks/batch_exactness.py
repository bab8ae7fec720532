"""Does a row computed inside a batch equal the same row computed alone, bit for bit, on this backend?

    python benchmarks/batch_exactness.py [--shape small|8b] [--device cpu|gpu]

exo-stable promises that a request's tokens do not depend on where it ran. Continuous batching computes
several requests' decode steps in one forward call; that keeps the promise only if the backend's kernels
give each row the same bits whatever else is in the batch. This script measures it at three levels:

- ``matmul``: row 0 of ``X[:B] @ W.T`` against ``X[:1] @ W.T``, for float32 / bfloat16 / float16 and
  batch sizes 1..64 (a matrix-vector kernel for one row, a tiled one for several).
- ``quantized``: the same for ``mx.quantized_matmul`` at 4 and 8 bits.
- ``decode``: one decode step of mlx-lm's own llama ``Model`` for R requests of different lengths, each
  prefilled alone, then (a) stepped alone and (b) stepped together over a left-padded batch cache; the
  logits of each row are compared. Also (c) ``bucket``: the same rows stepped inside a fixed batch shape
  with different companions, which says whether a fixed shape makes a row independent of its neighbours.

- ``stage_probe``: what a stage measures when it loads in ``--batch exact`` mode
  (:meth:`StageCompute.probe_rows`): every distinct matrix product of the default model (SmolLM2-135M), per
  dtype, at each batch size up to 16 (the default ``--batch-limit``); the engine batches up to the last
  size before the first that differs.

Each case reports whether every row was bit-identical and the largest absolute difference, plus the
time of one batched step against B single steps. Saves benchmarks/results/batch_exactness_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models import llama
from mlx_lm.models.cache import BatchKVCache, KVCache

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 2, 3, 4, 8, 16, 32, 64)
PROBE_ROWS = 16  # the default --batch-limit
SHAPES: dict[str, dict[str, int]] = {
    # SmolLM2-135M's widths: what the CPU tests and the default model run.
    "small": {"hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "layers": 4, "vocab": 49152},
    # Llama-3-8B's widths with a few layers: what the GPU figures run.
    "8b": {"hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8, "layers": 2, "vocab": 128256},
}


def _bits(a: mx.array) -> np.ndarray:
    a = a.astype(mx.float32) if a.dtype in (mx.bfloat16, mx.float16) else a
    return np.array(a)


def _compare(rows_alone: list[mx.array], rows_batched: list[mx.array]) -> dict[str, Any]:
    equal, worst = True, 0.0
    for alone, batched in zip(rows_alone, rows_batched, strict=True):
        a, b = _bits(alone), _bits(batched)
        if not np.array_equal(a, b):
            equal = False
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return {"identical": equal, "max_abs_diff": worst}


def _timed(fn: Callable[[], mx.array], repeats: int = 5) -> float:
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeats


def matmul_cases(shape: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    key = iter(mx.random.split(mx.random.key(1), 16))
    k, n = shape["hidden"], shape["ffn"]
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        w = (mx.random.normal((n, k), key=next(key)) * 0.02).astype(dtype)
        x = mx.random.normal((max(BATCHES), k), key=next(key)).astype(dtype)
        mx.eval(w, x)
        alone = [x[i : i + 1] @ w.T for i in range(max(BATCHES))]
        mx.eval(alone)
        for b in BATCHES:
            batched = x[:b] @ w.T
            mx.eval(batched)
            row = _compare(alone[:b], [batched[i : i + 1] for i in range(b)])
            out.append({"case": "matmul", "dtype": str(dtype), "batch": b, **row})
    return out


def quantized_cases(shape: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    key = iter(mx.random.split(mx.random.key(2), 16))
    k, n = shape["hidden"], shape["ffn"]
    for bits in (4, 8):
        w = (mx.random.normal((n, k), key=next(key)) * 0.02).astype(mx.bfloat16)
        qw, qs, qb = mx.quantize(w, group_size=64, bits=bits)
        x = mx.random.normal((max(BATCHES), k), key=next(key)).astype(mx.bfloat16)
        mx.eval(qw, qs, qb, x)

        def qmm(a: mx.array, qw: mx.array = qw, qs: mx.array = qs, qb: mx.array = qb, bits: int = bits) -> mx.array:
            return mx.quantized_matmul(a, qw, qs, qb, group_size=64, bits=bits)

        alone = [qmm(x[i : i + 1]) for i in range(max(BATCHES))]
        mx.eval(alone)
        for b in BATCHES:
            batched = qmm(x[:b])
            mx.eval(batched)
            row = _compare(alone[:b], [batched[i : i + 1] for i in range(b)])
            out.append({"case": "quantized_matmul", "dtype": f"q{bits}", "batch": b, **row})
    return out


def _model(shape: dict[str, int], dtype: mx.Dtype) -> llama.Model:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        intermediate_size=shape["ffn"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        rms_norm_eps=1e-5,
        vocab_size=shape["vocab"],
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.random.seed(3)
    params = model.parameters()
    model.update(
        _tree_map(lambda p: (mx.random.normal(p.shape) * 0.02).astype(dtype), params)  # type: ignore[no-any-return]
    )
    mx.eval(model.parameters())
    return model


def _tree_map(fn: Callable[[mx.array], mx.array], tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tree_map(fn, v) for v in tree]
    return fn(tree)


def _prefill_alone(model: llama.Model, prompt: list[int]) -> tuple[list[KVCache], int]:
    cache = [KVCache() for _ in model.layers]
    logits = model(mx.array([prompt[:-1]]), cache=cache)
    mx.eval(logits, [c.state for c in cache])
    return cache, prompt[-1]


def _batch_cache(caches: list[list[KVCache]], width: int) -> list[BatchKVCache]:
    """A left-padded batch cache holding each request's own keys and values (padded to ``width``)."""
    lengths = [c[0].offset for c in caches]
    pads = [width - n for n in lengths]
    out = []
    for layer in range(len(caches[0])):
        keys, values = [], []
        for row, cache in enumerate(caches):
            k, v = cache[layer].keys_and_values()
            if pads[row]:
                zk = mx.zeros((1, k.shape[1], pads[row], k.shape[3]), dtype=k.dtype)
                zv = mx.zeros((1, v.shape[1], pads[row], v.shape[3]), dtype=v.dtype)
                k, v = mx.concatenate([zk, k], axis=2), mx.concatenate([zv, v], axis=2)
            keys.append(k)
            values.append(v)
        bc = BatchKVCache(pads)
        bc.keys, bc.values = mx.concatenate(keys, axis=0), mx.concatenate(values, axis=0)
        bc.offset = bc.offset + width
        bc._idx = width
        out.append(bc)
    return out


def _decode_case(model: llama.Model, shape: dict[str, int], dtype: mx.Dtype, b: int, rng: Any) -> list[dict[str, Any]]:
    prompts = [list(map(int, rng.integers(0, shape["vocab"], size=int(n)))) for n in rng.integers(5, 40, size=b)]
    prefilled = [_prefill_alone(model, p) for p in prompts]
    width = max(c[0].offset for c, _ in prefilled)

    def alone_step(i: int) -> mx.array:
        cache, last = prefilled[i]
        logits = model(mx.array([[last]]), cache=cache)
        for c in cache:
            c.trim(1)
        return logits[0, -1]

    def batched_step() -> mx.array:
        cache = _batch_cache([c for c, _ in prefilled], width)
        return model(mx.array([[last] for _, last in prefilled]), cache=cache)[:, -1]

    alone = [alone_step(i) for i in range(b)]
    mx.eval(alone)
    batched = batched_step()
    mx.eval(batched)
    t_batched = _timed(batched_step)
    t_alone = _timed(lambda: mx.stack([alone_step(i) for i in range(b)]))
    out = [
        {
            "case": "decode",
            "dtype": str(dtype),
            "batch": b,
            **_compare(alone, [batched[i] for i in range(b)]),
            "batched_step_ms": round(t_batched * 1e3, 3),
            "alone_steps_ms": round(t_alone * 1e3, 3),
            "speedup": round(t_alone / t_batched, 2),
        }
    ]
    if b >= 2:
        # Row 0 inside the same batch size with other companions (and another padded width): does a fixed
        # batch shape make a row independent of its neighbours?
        others = [list(map(int, rng.integers(0, shape["vocab"], size=int(n)))) for n in rng.integers(5, 40, size=b)]
        swapped = [prefilled[0]] + [_prefill_alone(model, p) for p in others[1:]]
        cache2 = _batch_cache([c for c, _ in swapped], max(c[0].offset for c, _ in swapped))
        logits2 = model(mx.array([[last] for _, last in swapped]), cache=cache2)[:, -1]
        mx.eval(logits2)
        out.append(
            {"case": "bucket_neighbours", "dtype": str(dtype), "batch": b, **_compare([batched[0]], [logits2[0]])}
        )
    return out


def decode_cases(shape: dict[str, int], dtype: mx.Dtype) -> list[dict[str, Any]]:
    model = _model(shape, dtype)
    rng = np.random.default_rng(4)
    out: list[dict[str, Any]] = []
    for b in (1, 2, 4, 8, 16):
        out += _decode_case(model, shape, dtype, b, rng)
    return out


def stage_probe_cases(device: str) -> list[dict[str, Any]]:
    import sys

    sys.path.insert(0, str(ROOT))
    from exo_stable.engine.batching import BatchMode, exact_limit
    from exo_stable.engine.loader import open_model
    from exo_stable.engine.model import LayerRange
    from exo_stable.engine.modelspec import Dtype
    from exo_stable.engine.stagecompute import StageCompute
    from exo_stable.engine.store import ensure_default_model

    source = open_model(ensure_default_model(progress=False))
    n = source.spec.num_hidden_layers
    out = []
    for dtype in (Dtype.FLOAT32, Dtype.BFLOAT16, Dtype.FLOAT16, Dtype.QUANTIZED):
        stage = StageCompute(source, LayerRange(0, n, n), dtype, batch=BatchMode.OFF)
        stage.load()
        probe = stage.probe_rows(PROBE_ROWS)
        out += [
            {"case": "stage_probe", "dtype": str(dtype), "batch": b, "identical": ok, "max_abs_diff": None}
            for b, ok in probe.items()
        ]
        out.append({"case": "stage_probe_limit", "dtype": str(dtype), "batch": exact_limit(probe), "identical": True})
        print(f"{device} {dtype}: exact up to {exact_limit(probe)} rows", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu" if mx.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--probe-only", action="store_true", help="only the stage_probe rows (the default model)")
    args = parser.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    shape = SHAPES[args.shape]
    rows = [] if args.probe_only else matmul_cases(shape) + quantized_cases(shape)
    for dtype in () if args.probe_only else (mx.float32, mx.bfloat16):
        rows += decode_cases(shape, dtype)
    rows += stage_probe_cases(args.device)
    for r in rows:
        extra = f"  batched {r['batched_step_ms']} ms vs alone {r['alone_steps_ms']} ms" if "speedup" in r else ""
        mark = "identical" if r["identical"] else f"DIFFERS (max {r.get('max_abs_diff') or 0:.3g})"
        print(f"{r['case']:18} {r['dtype']:14} B={r['batch']:<3} {mark}{extra}")
    result = {
        "device": args.device,
        "shape": args.shape,
        "mlx": mx.__version__,
        "machine": platform.machine(),
        "device_info": {k: str(v) for k, v in mx.device_info().items()},
        "rows": rows,
    }
    name = f"batch_exactness_{args.device}_{'probe' if args.probe_only else args.shape}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
