"""Single-device prefill and decode speed of the default model for each dtype (and each BLAS on Linux).

    python benchmarks/bench_engine.py [--prompt-tokens 128] [--decode-tokens 48] [--dtypes ...]

Each configuration runs in a fresh child process (LD_PRELOAD must be set before Python starts), prints a
table, and saves benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


async def measure(dtype: str, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict[str, Any]:
    from exo_stable.engine.loader import open_model
    from exo_stable.engine.modelspec import Dtype
    from exo_stable.engine.sampling import SamplingParams
    from exo_stable.engine.single import SingleDeviceEngine
    from exo_stable.engine.store import ensure_default_model

    source = open_model(ensure_default_model(progress=False))
    engine = SingleDeviceEngine(source, dtype=Dtype(dtype), step_timeout_s=600)
    started = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - started
    text = "The history of the city begins with a small settlement on the river. " * 64
    prompt = source.tokenizer.encode(text)[:prompt_tokens]
    best_prefill, best_decode = 0.0, 0.0
    try:
        for _ in range(repeats):
            gen = engine.generate(prompt, SamplingParams(), decode_tokens + 1)
            t0 = time.perf_counter()
            await anext(gen)  # prefill and the first token
            t1 = time.perf_counter()
            count = 0
            async for _tok in gen:
                count += 1
            t2 = time.perf_counter()
            best_prefill = max(best_prefill, len(prompt) / (t1 - t0))
            best_decode = max(best_decode, count / (t2 - t1))
    finally:
        engine.close()
    return {
        "dtype": dtype,
        "blas": "openblas" if "openblas" in os.environ.get("LD_PRELOAD", "") else "bundled",
        "load_s": round(load_s, 2),
        "prompt_tokens": len(prompt),
        "prefill_tok_s": round(best_prefill, 1),
        "decode_tokens": decode_tokens,
        "decode_tok_s": round(best_decode, 2),
    }


def child(args: argparse.Namespace) -> None:
    result = asyncio.run(measure(args.child, args.prompt_tokens, args.decode_tokens, args.repeats))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "quantized", "bfloat16", "float16"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blas", nargs="+", default=None, help="openblas and/or bundled (Linux)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from exo_stable.engine.platform import find_openblas

    openblas = find_openblas() if sys.platform.startswith("linux") else None
    blas_choices = args.blas or (["openblas", "bundled"] if openblas else ["bundled"])
    rows: list[dict[str, Any]] = []
    for blas in blas_choices:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if blas == "openblas":
            if openblas is None:
                raise SystemExit("OpenBLAS is not installed (Debian: apt-get install libopenblas0-pthread)")
            env["LD_PRELOAD"] = openblas
        for dtype in args.dtypes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                dtype,
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--decode-tokens",
                str(args.decode_tokens),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=1800)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{row['blas']:<9} {row['dtype']:<10} load {row['load_s']:6.2f}s  "
                f"prefill {row['prefill_tok_s']:8.1f} tok/s  decode {row['decode_tok_s']:6.2f} tok/s",
                flush=True,
            )
    report = {
        "benchmark": "engine",
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {RESULTS / 'engine.json'}")


if __name__ == "__main__":
    main()
