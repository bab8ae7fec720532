"""Where a batched engine step's time goes on the MLX thread, with the real compute.

    python benchmarks/engine_step_times.py [--model random:llama-3-8b] [--dtype bfloat16] [--streams 16]

``--streams`` concurrent greedy requests run through the single-device engine (``--batch fast``); the
scheduler's steps and the batched greedy call (:meth:`StageCompute.pick_rows_ahead`) are timed from the
inside. Per round, medians in ms:

- ``step``: one scheduler step (planning excluded: the batched call and handing the tokens over);
- ``gap``: from the end of one step to the start of the next (the inbox, planning, the job queue);
- ``pick``: the batched greedy call, of which ``build`` is building the queued step's graph and ``queue``
  the ``mx.async_eval`` that queues it (on CUDA it waits for room behind the step computing); the rest is
  reading the tokens of the step before.

With ``gap`` near zero and ``step`` near ``pick``, the engine's step costs what its compute costs (compare
``pick`` with ``ahead`` of benchmarks/batch_step_parts.py, the same call in a bare loop). Saves
benchmarks/results/engine_step_times_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exo_stable.engine import device as devices  # noqa: E402
from exo_stable.engine import scheduler as scheduler_module  # noqa: E402
from exo_stable.engine import stagecompute  # noqa: E402
from exo_stable.engine.batching import BatchMode  # noqa: E402
from exo_stable.engine.loader import open_model  # noqa: E402
from exo_stable.engine.modelspec import Dtype  # noqa: E402
from exo_stable.engine.sampling import SamplingParams  # noqa: E402
from exo_stable.engine.single import SingleDeviceEngine  # noqa: E402

PARTS = ("step", "gap", "pick", "build", "queue")


class Timers:
    """Wall times of the engine's parts, recorded from inside (MLX thread only)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {part: [] for part in PARTS}
        self.last_end: float | None = None

    def clear(self) -> None:
        for values in self.times.values():
            values.clear()
        self.last_end = None

    def timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[part].append(time.perf_counter() - started)

        return wrapper

    def medians(self) -> dict[str, float]:
        return {part: statistics.median(v) * 1000 for part, v in self.times.items() if v}


class _QueueTimed:
    """``mx`` as stagecompute sees it, with ``async_eval`` timed."""

    def __init__(self, timers: Timers) -> None:
        self._async_eval = timers.timed("queue", mx.async_eval)

    def __getattr__(self, name: str) -> Any:
        return self._async_eval if name == "async_eval" else getattr(mx, name)


def instrument(timers: Timers) -> None:
    compute_cls = stagecompute.StageCompute
    compute_cls._rows_call = timers.timed("build", compute_cls._rows_call)  # type: ignore[method-assign]
    compute_cls.pick_rows_ahead = timers.timed("pick", compute_cls.pick_rows_ahead)  # type: ignore[method-assign]
    setattr(stagecompute, "mx", _QueueTimed(timers))  # noqa: B010 (the module's ``mx``, for this process)
    run_step = scheduler_module.BatchScheduler._run_step

    def step(self: scheduler_module.BatchScheduler, plan: Any) -> None:
        started = time.perf_counter()
        if timers.last_end is not None:
            timers.times["gap"].append(started - timers.last_end)
        run_step(self, plan)
        timers.last_end = time.perf_counter()
        timers.times["step"].append(timers.last_end - started)

    scheduler_module.BatchScheduler._run_step = step  # type: ignore[method-assign]


async def measure(args: argparse.Namespace, timers: Timers) -> list[dict[str, float]]:
    engine = SingleDeviceEngine(
        open_model(args.model),
        dtype=Dtype(args.dtype),
        batch=BatchMode.FAST,
        batch_limit=args.streams,
        max_requests=2 * args.streams,
    )
    await engine.start()
    rng = np.random.default_rng(0)
    vocab = min(open_model(args.model).spec.vocab_size, 30000)
    rounds = []
    try:
        for r in range(args.rounds):
            timers.clear()
            prompts = [[int(t) for t in rng.integers(0, vocab, size=24)] for _ in range(args.streams)]
            stamps: list[float] = []

            async def one(prompt: list[int], stamps: list[float]) -> None:
                async for _ in engine.generate(prompt, SamplingParams(temperature=0.0), args.tokens):
                    stamps.append(time.perf_counter())

            await asyncio.gather(*(one(p, stamps) for p in prompts))
            stamps.sort()
            start = stamps[args.streams - 1]  # every stream has its first token
            after = sum(1 for s in stamps if s > start)
            figures = {"tok_s": after / (stamps[-1] - start), **timers.medians()}
            rounds.append(figures)
            print(f"round {r}: " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    finally:
        engine.close()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    kind = devices.resolve(None)
    devices.choose(kind)
    devices.activate(kind)
    timers = Timers()
    instrument(timers)
    rounds = asyncio.run(measure(args, timers))
    later = rounds[1:] or rounds  # the first round warms up
    result: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "streams": args.streams,
        "device": devices.describe(kind),
        "host": platform.node(),
        "rounds": rounds,
        "median_after_first": {k: statistics.median(r[k] for r in later) for k in later[0]},
    }
    name = "gpu" if mx.default_device() == mx.gpu else "cpu"
    path = args.out or ROOT / "benchmarks" / "results" / f"engine_step_times_{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
