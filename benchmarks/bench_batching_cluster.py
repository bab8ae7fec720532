"""Continuous batching in the stages: aggregate tokens/s at 1, 4 and 8 streams over 2 and 3 local stages,
batched (``--batch-limit 16``) against one step at a time (``--batch off``), in the same run.

    python benchmarks/bench_batching_cluster.py [--nodes 2 3] [--streams 1 4 8] [--max-tokens 48] [--repeats 2]

Starts real node processes on 127.0.0.1 (the default model, float32) for each (stages, mode), streams
greedy requests through the OpenAI API (the two modes' clusters run side by side and are measured in
alternation, round by round), and reads each stage's counters from ``/health`` before and after
every measurement: the mean rows per forward call, and how busy each stage's compute thread was. The sum
of the stages' busy fractions is how many stages computed at once on average (above 1: the requests'
micro-batches overlap across stages). Saves benchmarks/results/batching_cluster.json.

The machine's cores are shared: compare the ratios of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_cluster import PROMPTS, Cluster, one_stream

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = {"batched": ("--batch-limit", "16"), "one_at_a_time": ("--batch", "off")}


async def stage_counters(session: aiohttp.ClientSession, ports: list[int]) -> list[dict[str, float]]:
    out = []
    for port in ports:
        async with session.get(f"http://127.0.0.1:{port}/health") as resp:
            batching = (await resp.json())["stage"]["batching"]
        out.append(
            {
                "compute_s": batching["compute_s"],
                "calls": batching["forward_calls"],
                "rows": batching["batched_rows"],
                "singles": batching["batch_size"]["1"],
            }
        )
    return out


async def streams(session: aiohttp.ClientSession, cluster: Cluster, c: int, max_tokens: int) -> dict[str, Any]:
    """``c`` greedy streams at once (owners spread over the nodes); aggregate tokens/s and stage activity."""
    before = await stage_counters(session, cluster.ports)
    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(one_stream(session, cluster.ports[i % cluster.n], PROMPTS[i % len(PROMPTS)], max_tokens))
            for i in range(c)
        ]
    elapsed = time.perf_counter() - started
    after = await stage_counters(session, cluster.ports)
    busy = [(a["compute_s"] - b["compute_s"]) / elapsed for a, b in zip(after, before, strict=True)]
    calls = sum(a["calls"] - b["calls"] for a, b in zip(after, before, strict=True))
    rows = sum(a["rows"] - b["rows"] + a["singles"] - b["singles"] for a, b in zip(after, before, strict=True))
    return {
        "tok_s": sum(t.result()["tokens"] for t in tasks) / elapsed,
        "busy": [round(b, 3) for b in busy],
        "stages_at_once": round(sum(busy), 3),
        "rows_per_call": round(rows / calls, 3) if calls else 0.0,
    }


async def measure(n: int, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Both modes' clusters up at once (idle nodes cost little), measured alternately, round by round, so
    that the load of a shared machine falls on both alike."""
    clusters = {mode: Cluster(n, args.dtype, log_dir, MODES[mode]) for mode in MODES}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
            for cluster in clusters.values():
                await cluster.wait_ready(session)
                await one_stream(session, cluster.ports[0], PROMPTS[0], 8)  # warm-up
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {(m, c): [] for m in MODES for c in args.streams}
            for c in args.streams:
                for _ in range(args.repeats):
                    for mode, cluster in clusters.items():
                        runs[mode, c].append(await streams(session, cluster, c, args.max_tokens))
            rows = []
            for mode in MODES:
                row: dict[str, Any] = {"stages": n, "mode": mode, "streams": {}}
                for c in args.streams:
                    done = runs[mode, c]
                    best = max(done, key=lambda r: r["tok_s"])
                    row["streams"][str(c)] = {
                        "tok_s": round(statistics.median(r["tok_s"] for r in done), 2),
                        "tok_s_runs": [round(r["tok_s"], 2) for r in done],
                        "stages_at_once": best["stages_at_once"],
                        "busy": best["busy"],
                        "rows_per_call": best["rows_per_call"],
                    }
                rows.append(row)
            return rows
    finally:
        for cluster in clusters.values():
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--code", default="", help="what code ran (commits), recorded in the JSON")
    parser.add_argument("--out", default="batching_cluster.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="exo-bench-batch-") as tmp:
        for n in args.nodes:
            for row in asyncio.run(measure(n, args, Path(tmp))):
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\n{'stages':>6} {'streams':>7} {'batched':>9} {'one-at-a-time':>14} {'ratio':>6}"
        f" {'rows/call':>9} {'at once':>8}"
    )
    ratios: dict[str, float] = {}
    for n in args.nodes:
        on = next(r for r in rows if r["stages"] == n and r["mode"] == "batched")
        off = next(r for r in rows if r["stages"] == n and r["mode"] == "one_at_a_time")
        for c in map(str, args.streams):
            a, b = on["streams"][c], off["streams"][c]
            ratio = round(a["tok_s"] / b["tok_s"], 3)
            ratios[f"{n}x{c}"] = ratio
            print(
                f"{n:>6} {c:>7} {a['tok_s']:>9.2f} {b['tok_s']:>14.2f} {ratio:>6} "
                f"{a['rows_per_call']:>9} {a['stages_at_once']:>8}"
            )
    report = {
        "benchmark": "batching_cluster",
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": args.code,
        "results": rows,
        "batched_over_one_at_a_time": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {RESULTS / args.out}")


if __name__ == "__main__":
    main()
