"""One stream alone: the batching engine against the unbatched one, each in a process of its own.

    python benchmarks/bench_one_stream.py [--model PATH|random:<shape>] [--dtype D] [--rounds 4]

Two engines in one process do not compare fairly: on the 2-core CPU the engine built second decoded up to
8% faster whichever it was (benchmarks/bench_batching.py builds the batched one first). A node runs one
engine, so here every measurement is a fresh process with one engine: the batched one (``--mode``, the
default ``exact``) and the unbatched one (``--batch off``) alternate, the order swapped every round; each
process warms up with one answer, then times ``--tokens`` greedy tokens after the first, twice. Medians of
the rounds; saves benchmarks/results/one_stream_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def child(args: argparse.Namespace) -> list[float]:
    from exo_stable.engine import device as devices
    from exo_stable.engine.batching import BatchMode
    from exo_stable.engine.loader import open_model
    from exo_stable.engine.modelspec import Dtype
    from exo_stable.engine.sampling import SamplingParams
    from exo_stable.engine.single import SingleDeviceEngine

    kind = devices.resolve(args.device)
    devices.choose(kind)
    engine = SingleDeviceEngine(open_model(args.model), dtype=Dtype(args.dtype), batch=BatchMode(args.child))
    await engine.start()
    prompt = list(range(100, 100 + args.prompt_tokens))
    rates = []
    try:
        for attempt in range(3):  # the first warms up
            n, first = 0, 0.0
            async for _ in engine.generate(prompt, SamplingParams(temperature=0.0), args.tokens + 1):
                n += 1
                if n == 1:
                    first = time.perf_counter()
            if attempt:
                rates.append((n - 1) / (time.perf_counter() - first))
    finally:
        engine.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model path or random:<shape> (default: the default model)")
    parser.add_argument("--dtype", help="default: the platform's")
    parser.add_argument("--device", choices=["cpu", "gpu"], help="default: the best available")
    parser.add_argument("--mode", choices=["exact", "fast"], default="exact", help="the batched engine's --batch")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from exo_stable.engine import device as devices
    from exo_stable.engine.platform import default_dtype
    from exo_stable.engine.store import ensure_default_model

    kind = devices.resolve(args.device)
    args.model = args.model or str(ensure_default_model(progress=False))
    args.dtype = args.dtype or default_dtype(kind.value).value
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return
    started = time.perf_counter()
    names = {"batched": args.mode, "unbatched": "off"}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else list(names)[::-1]:
            command = [sys.executable, __file__, "--child", names[name], "--model", args.model, "--dtype", args.dtype]
            command += ["--device", kind.value, "--tokens", str(args.tokens)]
            command += ["--prompt-tokens", str(args.prompt_tokens)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rates[name] += got
            print(f"round {r} {name:9}: " + " ".join(f"{x:.2f}" for x in got) + " tok/s", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    result: dict[str, Any] = {
        "tok_s_median": medians,
        "tok_s_all": rates,
        "batched_over_unbatched": medians["batched"] / medians["unbatched"],
        "model": Path(args.model).name if not args.model.startswith("random:") else args.model,
        "dtype": args.dtype,
        "mode": args.mode,
        "device": devices.describe(kind),
        "machine": platform.machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model", "child")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    out = args.out or ROOT / "benchmarks" / "results" / f"one_stream_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
