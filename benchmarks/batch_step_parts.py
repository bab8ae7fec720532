"""Where the time of one batched decode step goes: graph building, the device, attention, sampling.

    python benchmarks/batch_step_parts.py [--model random:llama-3-8b] [--dtype bfloat16] [--rows 1 4 16]

For each row count, ``rows`` requests each read a short prompt, then ``--steps`` decode steps run through
:meth:`StageCompute.decode_batch` (what the batching engine runs), timed as a whole and in parts:

- ``step``: one whole batched step (forward over all rows, then each row's pick), ms.
- ``build``: building the step's graph with no evaluation on the way (the overlap every few layers off), ms.
- ``eval``: evaluating that graph, ms (``build + eval`` is a step without the overlap and without picks).
- ``no_attention``: a step whose attention returns the queries (what the dense work and the caches' writes
  cost without any attention kernel), ms.
- ``shared_attention``: a step whose rows, all at the same length here, attend in one call over their
  keys and values stacked (what a batched attention would cost; not exact, only a measurement), ms.
- ``ahead`` (rows > 1): one step through :meth:`StageCompute.pick_rows_ahead`, each step queued before the
  last one's tokens are read (what the batching engine runs for greedy rows), ms; ``ahead_overlap``: the
  same with the queued step's evaluation started every few layers while it is built (as before
  ``stagecompute.QUEUED_OVERLAP`` was off); ``ahead_no_overlap``: no forward call starting early at all
  (the first, unqueued step included).
- ``eval_no_mask`` and ``eval_slice_write`` (slots): ``eval`` with the rows' one attention call unmasked, and
  with their keys and values written as one slice instead of a scatter, both right only because every row
  has the same length here, ms: what the per-row lengths cost. ``eval_bool_mask``: the rows' mask given as
  a boolean one (what it was before it was built additive once per step).
- ``--compare-mlx-lm``: the same steps through mlx-lm's own model and ``BatchKVCache`` on the same weights
  (``mlx_lm``: ``build`` and ``eval`` as above, ``eval_no_mask`` without its mask, and ``ahead``: each step
  queued before the last one's tokens are read, as its ``BatchGenerator`` runs them), ms.

Each is measured with every request's cache its own (``rowwise``, the three variants above too) and with the
batched requests' caches as slots of one buffer per layer (``slots``, what ``--batch fast`` runs).

Saves benchmarks/results/batch_step_parts_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exo_stable.engine import batching, slots, stagecompute  # noqa: E402
from exo_stable.engine import device as devices  # noqa: E402
from exo_stable.engine import model as model_module  # noqa: E402
from exo_stable.engine.batching import BatchMode  # noqa: E402
from exo_stable.engine.loader import open_model  # noqa: E402
from exo_stable.engine.model import LayerRange  # noqa: E402
from exo_stable.engine.modelspec import Dtype  # noqa: E402
from exo_stable.engine.sampling import SamplingParams  # noqa: E402
from exo_stable.engine.stagecompute import StageCompute  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _no_attention(self: batching.RowsCache, queries: mx.array, scale: float, mask: Any) -> mx.array:
    self._fetched = []
    return queries


def _shared_attention(self: batching.RowsCache, queries: mx.array, scale: float, mask: Any) -> mx.array:
    keys = mx.concatenate([k for k, _ in self._fetched], axis=0)
    values = mx.concatenate([v for _, v in self._fetched], axis=0)
    self._fetched = []
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=None)


def _slice_write(self: slots.SlotRows, keys: mx.array, values: mx.array) -> None:
    """SlotRows.update for rows that all hold slots 0.. in order and all have the same length (a measurement)."""
    at = self._offsets[0]
    k, v = self.arena.reserve(self.layer, at + 1, keys, values)
    k[:, :, at : at + 1, :] = keys
    v[:, :, at : at + 1, :] = values
    for cache in self.caches:
        cache.offset += 1
    self._fetched = (k, v)


def _unmasked(self: slots.SlotRows, queries: mx.array, scale: float) -> mx.array:
    """SlotRows.attend without the per-row mask (right when every row has the same length; a measurement)."""
    assert self._fetched is not None
    k, v = self._fetched
    self._fetched = None
    longest = max(self._offsets) + 1
    out: mx.array = mx.fast.scaled_dot_product_attention(
        queries, k[:, :, :longest, :], v[:, :, :longest, :], scale=scale, mask=None
    )
    return out


def _bool_mask(self: slots.SlotRows, dtype: mx.Dtype) -> mx.array:
    """SlotRows' mask as a boolean one (the same scores; MLX's GPU kernels convert it at every layer)."""
    longest = max(self._offsets) + 1
    lengths = mx.array([o + 1 for o in self._offsets], dtype=mx.int32)
    return (mx.arange(longest)[None, :] < lengths[:, None]).reshape(len(self.caches), 1, 1, longest)


def build_eval(forward: Callable[[], mx.array], steps: int) -> tuple[float, float]:
    """Median ms of building a step's graph (no evaluation on the way) and of evaluating it."""
    builds, evals = [], []
    with patched(model_module, "_overlap_every", lambda: 0):
        for _ in range(steps):
            started = time.perf_counter()
            logits = forward()
            built = time.perf_counter()
            mx.eval(logits)
            builds.append((built - started) * 1000)
            evals.append((time.perf_counter() - built) * 1000)
    return statistics.median(builds), statistics.median(evals)


def mlx_lm_steps(args: argparse.Namespace, rows: int) -> dict[str, float]:
    """Batched greedy steps of ``rows`` requests through mlx-lm's own model and BatchKVCache."""
    from bench_batching import mlx_lm_model
    from mlx_lm.models.cache import BatchKVCache

    model = mlx_lm_model(args.model, Dtype(args.dtype))
    rng = np.random.default_rng(rows)
    prompt = mx.array(
        rng.integers(0, min(open_model(args.model).spec.vocab_size, 30000), size=(rows, args.prompt_tokens)),
        dtype=mx.int32,
    )
    cache = [BatchKVCache(left_padding=[0] * rows) for _ in model.layers]
    last = [mx.argmax(model(prompt, cache=cache)[:, -1, :], axis=-1)]
    mx.eval(last)

    def forward() -> mx.array:
        logits = model(last[0][:, None], cache=cache)[:, -1, :]
        last[0] = mx.argmax(logits, axis=-1)
        return last[0]

    def ahead() -> None:  # as BatchGenerator steps: the next step is queued before this one's tokens are read
        following = mx.argmax(model(last[0][:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(following)  # type: ignore[no-untyped-call]
        last[0].tolist()
        last[0] = following

    build, evaluate = build_eval(forward, args.steps)
    with patched(BatchKVCache, "make_mask", lambda self, *a, **k: None):
        unmasked = build_eval(forward, args.steps)[1]
    queued = timed(ahead, args.steps)
    return {"build": build, "eval": evaluate, "eval_no_mask": unmasked, "ahead": queued, "tok_s": rows / queued * 1000}


def timed(fn: Callable[[], Any], steps: int) -> float:
    """Median ms of ``steps`` calls (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(args: argparse.Namespace, compute: StageCompute, rows: int, *, variants: bool) -> dict[str, float]:
    rng = np.random.default_rng(rows)
    rids = [f"r{i}" for i in range(rows)]
    last: list[int] = []
    for rid in rids:
        compute.open(rid, GREEDY)
        prompt = [int(t) for t in rng.integers(0, min(compute.source.spec.vocab_size, 30000), size=args.prompt_tokens)]
        last.append(compute.prefill_pick(rid, prompt, 0).token)
    position = [1]

    def step() -> None:
        picks = compute.decode_batch(rids, last, [position[0]] * rows)
        last[:] = [p.token for p in picks]
        position[0] += 1

    def forward_rows() -> mx.array:
        xs = mx.array([[t] for t in last], dtype=mx.int32)
        return compute._model().forward_rows(xs, [compute.requests[r].cache for r in rids])

    def ahead() -> None:
        last[:] = compute.pick_rows_ahead(rids, last, list(range(rows)))

    out: dict[str, float] = {"step": timed(step, args.steps)}
    if rows > 1:
        out["ahead"] = timed(ahead, args.steps)
        with patched(stagecompute, "QUEUED_OVERLAP", True):
            out["ahead_overlap"] = timed(ahead, args.steps)
        with patched(model_module, "_overlap_every", lambda: 0):
            out["ahead_no_overlap"] = timed(ahead, args.steps)
        compute.settle()
        last[:] = [p.token for p in compute.decode_batch(rids, last, [position[0]] * rows)]  # (undoes the queued step)
    out["build"], out["eval"] = build_eval(forward_rows, args.steps)
    if rows > 1 and stagecompute.SHARED_SLOTS:
        with patched(slots.SlotRows, "attend", _unmasked):
            out["eval_no_mask"] = build_eval(forward_rows, args.steps)[1]
        with patched(slots.SlotRows, "update", _slice_write):
            out["eval_slice_write"] = build_eval(forward_rows, args.steps)[1]
        with patched(slots.SlotRows, "_mask", _bool_mask):
            out["eval_bool_mask"] = build_eval(forward_rows, args.steps)[1]
    if rows > 1 and variants:
        with patched(batching.RowsCache, "attend", _no_attention):
            out["no_attention"] = timed(step, args.steps)
        with patched(batching.RowsCache, "attend", _shared_attention):
            out["shared_attention"] = timed(step, args.steps)
    out["tok_s"] = rows / out["step"] * 1000
    for rid in rids:
        compute.close(rid)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--layouts", nargs="+", choices=["rowwise", "slots"], default=["rowwise", "slots"])
    parser.add_argument("--compare-mlx-lm", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    kind = devices.resolve(None)
    devices.choose(kind)
    devices.activate(kind)
    device = devices.describe(kind)
    result: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "device": device}
    result["host"] = platform.node()
    source = open_model(args.model)
    n = source.spec.num_hidden_layers
    most = max(args.rows)
    for layout in args.layouts:
        stagecompute.SHARED_SLOTS = layout == "slots"  # read at load
        compute = StageCompute(
            source, LayerRange(0, n, n), Dtype(args.dtype), max_requests=most, batch=BatchMode.FAST, batch_limit=most
        )
        compute.load()
        for rows in args.rows:
            figures = measure(args, compute, rows, variants=layout == "rowwise")
            result.setdefault(layout, {})[rows] = figures
            print(f"{layout:7} {rows:3} rows: " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
        del compute
        gc.collect()
        mx.clear_cache()
    if args.compare_mlx_lm:
        for rows in args.rows:
            figures = mlx_lm_steps(args, rows)
            gc.collect()
            mx.clear_cache()
            result.setdefault("mlx_lm", {})[rows] = figures
            print(f"mlx_lm  {rows:3} rows: " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    name = "gpu" if mx.default_device() == mx.gpu else "cpu"
    path = args.out or ROOT / "benchmarks" / "results" / f"batch_step_parts_{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
