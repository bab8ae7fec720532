"""How often a forward call should start the GPU while its graph is still being built (exo_stable/engine/model.py).

    python benchmarks/gpu_overlap.py [--shape llama-3-8b] [--every 1 2 4] [--rounds 4]

On seeded random weights of a published shape, per dtype, in this process: the single-device engine's
greedy decode one step ahead and synchronous, one token waited for at a time (what every pipeline stage
does), with the device started every 1, 2, 4... layers (``OVERLAP_LAYERS``). The
settings alternate round by round so that the machine's drift falls on all of them alike; decode tokens/s
are medians over the rounds. Every setting must give the same tokens (the same operations; only the waits
move). Saves benchmarks/results/gpu_overlap.json. On a CPU the setting does nothing (there is no overlap).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_gpu import engine_once, prompt_text  # noqa: E402

from exo_stable.engine import device as devices  # noqa: E402
from exo_stable.engine import model as model_module  # noqa: E402
from exo_stable.engine import random_model  # noqa: E402
from exo_stable.engine.loader import open_model  # noqa: E402
from exo_stable.engine.modelspec import Dtype  # noqa: E402
from exo_stable.engine.single import SingleDeviceEngine  # noqa: E402


def set_every(n: int) -> None:
    model_module.OVERLAP_LAYERS = n  # read at each forward call


async def measure(name: str, dtype: Dtype, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    engine = SingleDeviceEngine(open_model(name), dtype=dtype, max_requests=4)
    await engine.start()
    runs: dict[str, list[float]] = {}
    answers: set[tuple[int, ...]] = set()
    try:
        await engine_once(engine, prompt, 8, lookahead=True)  # warm-up: kernels compile on first use
        await engine_once(engine, prompt, 8, lookahead=False)
        for _ in range(args.rounds):
            for n in args.every:
                set_every(n)
                for mode, ahead in (("ahead", True), ("sync", False)):
                    run = await engine_once(engine, prompt, args.decode_tokens, lookahead=ahead)
                    runs.setdefault(f"{mode}_every_{n}", []).append(run["decode_tok_s"])
                    answers.add(tuple(run["tokens"]))
    finally:
        engine.close()
    row: dict[str, Any] = {key: round(statistics.median(values), 1) for key, values in runs.items()}
    row["same_tokens"] = len(answers) == 1
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(random_model.SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "quantized"])
    parser.add_argument("--device", choices=["cpu", "gpu"], help="default: the best available")
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=448)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_overlap.json")
    args = parser.parse_args()
    kind = devices.resolve(args.device)
    devices.choose(kind)
    devices.activate(kind)
    name = f"{random_model.PREFIX}{args.shape}"
    prompt = open_model(name).tokenizer.encode(prompt_text(args.prompt_tokens, 1))
    report: dict[str, Any] = {"device": devices.describe(kind), "model": name, "mlx": mx.__version__}
    report["rounds"] = args.rounds
    for dtype in args.dtypes:
        report[dtype] = asyncio.run(measure(name, Dtype(dtype), prompt, args))
        print(dtype, json.dumps(report[dtype]), flush=True)
        gc.collect()
        mx.clear_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
