"""Continuous batching in the single-device engine: aggregate tokens/s by streams, with and without batching.

    python benchmarks/bench_batching.py [--model PATH|random:<shape>] [--dtype D] [--streams 1 2 4 8]
                                        [--compare-mlx-lm] [--device cpu|gpu]

In one run, alternating the engines round by round (neighbours and clocks move figures between runs):

1. Aggregate decode tokens/s at each number of concurrent greedy streams, with the engine batching decode
   steps (``--batch exact``, or ``--mode fast``) and without (``--batch off``, today's per-request steps
   with their one-step-ahead decode). Every stream's tokens are checked to be the same in both engines.
2. Interference: while 8 streams decode, a ``--long-prompt``-token prompt arrives; the 8 streams'
   inter-token p99 with it against without it, per engine.
3. ``--compare-mlx-lm``: mlx-lm's own ``BatchGenerator`` at the largest stream count on the same weights
   (a ``random:<shape>`` model only, the weights drawn as exo-stable draws them).

Defaults: the CPU and the default model; on a GPU pass ``--model random:llama-3-8b --dtype bfloat16
--streams 1 4 16 --mode fast --compare-mlx-lm``. Saves benchmarks/results/batching_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exo_stable.engine import device as devices  # noqa: E402
from exo_stable.engine import scheduler, stagecompute  # noqa: E402
from exo_stable.engine.batching import BatchMode  # noqa: E402
from exo_stable.engine.loader import open_model  # noqa: E402
from exo_stable.engine.modelspec import Dtype  # noqa: E402
from exo_stable.engine.platform import default_dtype  # noqa: E402
from exo_stable.engine.sampling import SamplingParams  # noqa: E402
from exo_stable.engine.single import SingleDeviceEngine  # noqa: E402
from exo_stable.engine.slicing import PREFILL_SHARE  # noqa: E402
from exo_stable.engine.store import ensure_default_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def prompts(source_vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(100, min(source_vocab, 30000), size=length)] for _ in range(count)]


async def streams_once(engine: SingleDeviceEngine, batch: list[list[int]], tokens: int) -> dict[str, Any]:
    """``len(batch)`` concurrent greedy streams; decode tokens/s counted from the last first token on."""
    stamps: list[list[float]] = [[] for _ in batch]
    outs: list[list[int]] = [[] for _ in batch]

    async def one(i: int) -> None:
        async for token in engine.generate(batch[i], GREEDY, tokens):
            outs[i].append(token)
            stamps[i].append(time.perf_counter())

    await asyncio.gather(*(one(i) for i in range(len(batch))))
    start = max(s[0] for s in stamps)
    end = max(s[-1] for s in stamps)
    counted = sum(sum(1 for t in s if t > start) for s in stamps)
    return {
        "aggregate_tok_s": counted / (end - start) if end > start else 0.0,
        "tokens": outs,
    }


def steps_so_far(engine: SingleDeviceEngine) -> dict[str, int]:
    """The engine's step counts so far: batched steps and their rows, steps queued ahead and undone."""
    batch, compute = engine.batch_stats, engine.compute_stats
    return {
        "steps": batch.steps if batch else 0,
        "rows": batch.decode_rows if batch else 0,
        "ahead": compute.rows_ahead + compute.steps_ahead,
        "undone": compute.rows_undone + compute.steps_undone,
    }


async def interference_once(
    engine: SingleDeviceEngine, batch: list[list[int]], tokens: int, long_prompt: list[int] | None
) -> dict[str, Any]:
    """8 streams decode; with ``long_prompt``, it arrives once each stream has its 8th token."""
    stamps: list[list[float]] = [[] for _ in batch]
    arrived = asyncio.Event()
    counts = [0]

    async def one(i: int) -> None:
        async for _ in engine.generate(batch[i], GREEDY, tokens):
            stamps[i].append(time.perf_counter())
            if len(stamps[i]) == 8:
                counts[0] += 1
                if counts[0] == len(batch):
                    arrived.set()

    first_token_s: list[float] = []

    async def late() -> None:
        async with asyncio.timeout(600):
            await arrived.wait()
        assert long_prompt is not None
        sent = time.perf_counter()
        async for _ in engine.generate(long_prompt, GREEDY, 1):
            first_token_s.append(time.perf_counter() - sent)

    jobs = [one(i) for i in range(len(batch))] + ([late()] if long_prompt else [])
    await asyncio.gather(*jobs)
    gaps = [b - a for s in stamps for a, b in itertools.pairwise(s[8:])]  # once all are decoding
    out = {"p99_gap_s": float(np.percentile(gaps, 99)), "median_gap_s": statistics.median(gaps)}
    if first_token_s:
        out["long_prompt_first_token_s"] = first_token_s[0]
    return out


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    source = open_model(args.model)
    dtype = Dtype(args.dtype)
    vocab = source.spec.vocab_size
    modes = {"batched": BatchMode(args.mode), "unbatched": BatchMode.OFF}
    if args.compare_rowwise:
        modes = {"batched": BatchMode.FAST, "batched_rowwise": BatchMode.FAST, "unbatched": BatchMode.OFF}
    if args.compare_unsliced:
        modes = {"batched": BatchMode(args.mode), "batched_unsliced": BatchMode(args.mode), "unbatched": BatchMode.OFF}
    if args.compare_rows_ahead:
        modes = {"batched": BatchMode(args.mode), "batched_not_ahead": BatchMode(args.mode), "unbatched": BatchMode.OFF}
    engines: dict[str, SingleDeviceEngine] = {}
    for name, mode in modes.items():
        stagecompute.SHARED_SLOTS = name != "batched_rowwise"  # read when the engine loads
        scheduler.ROWS_AHEAD = name != "batched_not_ahead"  # read when the engine starts
        engine = SingleDeviceEngine(
            open_model(args.model),
            dtype=dtype,
            batch=mode,
            batch_limit=max(args.streams),
            max_requests=32,
            prefill_share=None if name == "batched_unsliced" else args.prefill_share,
        )
        await engine.start()
        engines[name] = engine
    stagecompute.SHARED_SLOTS = True
    scheduler.ROWS_AHEAD = True
    limit = engines["batched"].batch_limit
    print(f"model {args.model} ({dtype}); batched engine's decode batch limit: {limit}", flush=True)
    rounds: dict[str, dict[int, list[float]]] = {name: {n: [] for n in args.streams} for name in engines}
    same = True
    result_rowwise_same: list[bool] = []
    for r in range(args.repeats):
        for n in args.streams:
            batch = prompts(vocab, n, args.prompt_tokens, seed=100 * r + n)
            answers = {}
            for name, engine in engines.items():
                before = steps_so_far(engine)
                out = await streams_once(engine, batch, args.decode_tokens)
                rounds[name][n].append(out["aggregate_tok_s"])
                answers[name] = out["tokens"]
                steps = {k: v - before[k] for k, v in steps_so_far(engine).items()}
                shown = "  ".join(f"{k} {v}" for k, v in steps.items())
                print(f"round {r} {name:9} {n:2} streams: {out['aggregate_tok_s']:8.1f} tok/s  {shown}", flush=True)
            same = same and answers["batched"] == answers["unbatched"]
            if "batched_rowwise" in answers:
                result_rowwise_same.append(answers["batched_rowwise"] == answers["unbatched"])
    result: dict[str, Any] = {
        "batch_limit": limit,
        "identical_tokens": same,
        "rowwise_identical_tokens": all(result_rowwise_same) if result_rowwise_same else None,
        "aggregate_tok_s": {name: {n: statistics.median(v) for n, v in per.items()} for name, per in rounds.items()},
    }
    for name in engines:
        agg = result["aggregate_tok_s"][name]
        result.setdefault("ratio_vs_one_stream", {})[name] = {n: agg[n] / agg[min(agg)] for n in agg}
    one = min(args.streams)
    result["one_stream_batched_over_unbatched"] = (
        result["aggregate_tok_s"]["batched"][one] / result["aggregate_tok_s"]["unbatched"][one]
    )
    if args.long_prompt:
        long_prompt = prompts(vocab, 1, args.long_prompt, seed=7)[0]
        eight = prompts(vocab, 8, args.prompt_tokens, seed=8)
        inter: dict[str, Any] = {}
        for name, engine in engines.items():
            without = await interference_once(engine, eight, args.interference_tokens, None)
            with_long = await interference_once(engine, eight, args.interference_tokens, long_prompt)
            inter[name] = {
                "without": without,
                "with_long_prompt": with_long,
                "p99_ratio": with_long["p99_gap_s"] / without["p99_gap_s"],
            }
            print(f"interference {name}: {json.dumps(inter[name])}", flush=True)
        result["interference"] = inter
    for engine in engines.values():
        engine.close()
    return result


def mlx_lm_model(name: str, dtype: Dtype) -> Any:
    """mlx-lm's own llama model on the weights exo-stable draws for a ``random:`` model (evaluated)."""
    from mlx import nn
    from mlx_lm.models import llama

    from exo_stable.engine import random_model

    source = open_model(name)
    if source.random is None:
        raise SystemExit("comparing with mlx-lm needs a random:<shape> model")
    model = llama.Model(llama.ModelArgs.from_dict(source.spec.mlx_lm_args()))
    quantized = dtype is Dtype.QUANTIZED
    if quantized:
        nn.quantize(model, group_size=random_model.QUANT.group_size, bits=random_model.QUANT.bits)
    weights, _ = random_model.generate(
        source.random, random_model.tensor_shapes(source.spec), dtype=mx.bfloat16, quantize=quantized
    )
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def mlx_lm_batch(args: argparse.Namespace, streams: int) -> dict[str, Any]:
    """mlx-lm's BatchGenerator on the weights exo-stable draws for a ``random:`` model."""
    from mlx_lm.generate import BatchGenerator

    model = mlx_lm_model(args.model, Dtype(args.dtype))
    batch = prompts(open_model(args.model).spec.vocab_size, streams, args.prompt_tokens, seed=1)
    gen = BatchGenerator(model, max_tokens=args.decode_tokens, completion_batch_size=streams)
    gen.insert(batch)
    counted = 0
    start: float | None = None
    while responses := gen.next_generated():
        if start is None:
            start = time.perf_counter()
            continue
        counted += len(responses)
    assert start is not None
    seconds = time.perf_counter() - start
    gen.close()
    return {"streams": streams, "aggregate_tok_s": counted / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model path or random:<shape> (default: the default model)")
    parser.add_argument("--dtype", help="default: the platform's")
    parser.add_argument("--device", choices=["cpu", "gpu"], help="default: the best available")
    parser.add_argument("--mode", choices=["exact", "fast"], default="exact", help="the batched engine's --batch")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--long-prompt", type=int, default=2000, help="0: skip the interference test")
    parser.add_argument("--interference-tokens", type=int, default=64)
    parser.add_argument("--compare-mlx-lm", action="store_true")
    parser.add_argument(
        "--compare-rowwise",
        action="store_true",
        help="--batch fast with the requests' caches in one buffer per layer, and with a cache each (row by row)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        help="what-if: prompt tokens per forward call for this run (the code's PREFILL_CHUNK otherwise)",
    )
    parser.add_argument(
        "--compare-unsliced",
        action="store_true",
        help="add a batched engine that reads each prompt chunk whole (before exo_stable.engine.slicing)",
    )
    parser.add_argument(
        "--compare-rows-ahead",
        action="store_true",
        help="add a batched engine that evaluates each batched step before building the next (no steps ahead)",
    )
    parser.add_argument(
        "--only-mlx-lm",
        action="store_true",
        help="measure only mlx-lm's BatchGenerator (--repeats times), in a process without exo-stable's engines",
    )
    parser.add_argument(
        "--prefill-share",
        type=float,
        default=PREFILL_SHARE,
        help="what-if: a prompt slice's time per step against the decode rows' (see exo_stable.engine.slicing)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.prefill_chunk:  # read by prompt_chunks() at each call
        stagecompute.PREFILL_CHUNK = stagecompute.PREFILL_CHUNK_CPU = args.prefill_chunk
    kind = devices.resolve(args.device)
    devices.choose(kind)
    devices.activate(kind)
    args.model = args.model or str(ensure_default_model(progress=False))
    args.dtype = args.dtype or default_dtype(kind.value).value
    started = time.perf_counter()
    if args.only_mlx_lm:
        runs = [mlx_lm_batch(args, max(args.streams)) for _ in range(args.repeats)]
        for run in runs:
            print(f"mlx-lm BatchGenerator {run['streams']} streams: {run['aggregate_tok_s']:8.1f} tok/s", flush=True)
        result: dict[str, Any] = {"mlx_lm_batch_generator_alone": runs}
    else:
        result = asyncio.run(measure(args))
    if args.compare_mlx_lm and not args.only_mlx_lm:
        gc.collect()
        mx.clear_cache()
        result["mlx_lm_batch_generator"] = mlx_lm_batch(args, max(args.streams))
    result.update(
        model=Path(args.model).name if not args.model.startswith("random:") else args.model,
        dtype=args.dtype,
        mode=args.mode,
        device=devices.describe(kind),
        machine=platform.machine(),
        mlx=mx.__version__,
        settings={k: v for k, v in vars(args).items() if k not in ("out", "model")},
        seconds=round(time.perf_counter() - started, 1),
    )
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    out = args.out or ROOT / "benchmarks" / "results" / f"batching_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
