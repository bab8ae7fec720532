"""The batching scheduler's own cost per step, with a compute that takes no time.

    python benchmarks/scheduler_overhead.py [--streams 16] [--tokens 512] [--rounds 3]

``--streams`` concurrent greedy requests run through the single-device engine (``--batch fast``, the tiny
random model) whose batched greedy step (:meth:`StageCompute.pick_rows_ahead`) is replaced by one that
returns at once: what is left per step is the scheduler (planning, the inbox, handing tokens over) and the
event loop's side (each reader taking its token). Compare it with a device step's time to see how much of
a batched step is the host's bookkeeping. Saves benchmarks/results/scheduler_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exo_stable.engine import device as devices  # noqa: E402
from exo_stable.engine.batching import BatchMode  # noqa: E402
from exo_stable.engine.loader import open_model  # noqa: E402
from exo_stable.engine.modelspec import Dtype  # noqa: E402
from exo_stable.engine.sampling import SamplingParams  # noqa: E402
from exo_stable.engine.single import SingleDeviceEngine  # noqa: E402


async def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    engine = SingleDeviceEngine(
        open_model("random:tiny"), dtype=Dtype.BFLOAT16, batch=BatchMode.FAST, batch_limit=args.streams
    )
    await engine.start()
    engine._compute.pick_rows_ahead = lambda rids, tokens, follow: [1] * len(rids)  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    rounds = []
    try:
        for r in range(args.rounds):
            prompts = [[int(t) for t in rng.integers(0, 200, size=24)] for _ in range(args.streams)]
            stats = engine.batch_stats
            assert stats is not None
            steps_before, rows_before = stats.steps, stats.decode_rows

            async def one(prompt: list[int]) -> None:
                async for _ in engine.generate(prompt, SamplingParams(temperature=0.0), args.tokens):
                    pass

            started = time.perf_counter()
            await asyncio.gather(*(one(p) for p in prompts))
            seconds = time.perf_counter() - started
            steps, rows = stats.steps - steps_before, stats.decode_rows - rows_before
            figures = {"ms_per_step": seconds / steps * 1000, "rows_per_step": rows / steps, "steps": steps}
            print(f"round {r}: " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
            rounds.append(figures)
    finally:
        engine.close()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    kind = devices.resolve(None)
    devices.choose(kind)
    devices.activate(kind)
    rounds = asyncio.run(measure(args))
    result: dict[str, Any] = {
        "streams": args.streams,
        "tokens": args.tokens,
        "ms_per_step_median": statistics.median(r["ms_per_step"] for r in rounds),
        "rounds": rounds,
        "device": devices.describe(kind),
        "machine": platform.machine(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    out = args.out or ROOT / "benchmarks" / "results" / "scheduler_overhead.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
