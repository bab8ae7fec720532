"""Eight streaming chats through two running servers, alternating: which one serves concurrent streams faster.

    exo-stable serve --port 52941 ...   # e.g. a checkout of the code before a change (PYTHONPATH=<checkout>)
    exo-stable serve --port 52942 ...   # and after it
    python benchmarks/serve_streams_ab.py 52941 52942 [--rounds 3] [--streams 8] [--max-tokens 64]

Each round sends ``--streams`` concurrent greedy chat completions (the ``openai`` client, streaming) to one
server, then to the other (the order swapped every round), and records the median and p99 time between a
stream's tokens and the aggregate tokens/s. Medians of the rounds; saves
benchmarks/results/serve_streams_ab.json. Both servers share the machine's cores: start them with nothing else
running, and compare within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parents[1]


async def streams_once(port: int, streams: int, max_tokens: int) -> dict[str, float]:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600)
    stamps: list[list[float]] = [[] for _ in range(streams)]

    async def one(i: int) -> None:
        chat = [{"role": "user", "content": f"Count from {i} upward, one number per line."}]
        response = await client.chat.completions.create(
            model="default",
            messages=chat,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps[i].append(time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.perf_counter() - started
    await client.close()
    gaps = [b - a for s in stamps for a, b in itertools.pairwise(s)]
    return {
        "median_gap_s": float(np.median(gaps)),
        "p99_gap_s": float(np.percentile(gaps, 99)),
        "aggregate_tok_s": sum(len(s) for s in stamps) / elapsed,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    ports = {"a": args.port_a, "b": args.port_b}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
    for r in range(args.rounds):
        for name in ports if r % 2 == 0 else list(ports)[::-1]:
            got = await streams_once(ports[name], args.streams, args.max_tokens)
            rounds[name].append(got)
            print(f"round {r} {name} (port {ports[name]}): {json.dumps(got)}", flush=True)
    medians = {name: {k: statistics.median(x[k] for x in per) for k in per[0]} for name, per in rounds.items()}
    return {"ports": ports, "medians": medians, "rounds": rounds, "settings": vars(args)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port_a", type=int)
    parser.add_argument("port_b", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_streams_ab.json")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print(json.dumps(result["medians"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
