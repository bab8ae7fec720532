"""Single stream and concurrent throughput of 1, 2 and 3 nodes on loopback, against the single device.

    python benchmarks/bench_cluster.py [--nodes 1 2 3] [--max-tokens 48] [--concurrency 1 2 4 8]

Starts real node processes on 127.0.0.1 (the default model, float32), waits for each cluster's pipeline,
and measures through the OpenAI streaming API: time to first token, decode tokens/s of one stream (and its
ratio to one node), and aggregate tokens/s with several streams at once. Saves benchmarks/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from nodeprocs import free_ports, sse_events, stop_all, wait_for_plan

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List five uses for a paperclip.",
    "Describe the water cycle in simple words.",
    "What makes a good cup of coffee?",
    "Write a poem about autumn leaves.",
    "How do airplanes fly?",
    "Give three tips for learning a language.",
]


class Cluster:
    def __init__(self, n: int, dtype: str, log_dir: Path, extra: tuple[str, ...] = ()) -> None:
        self.ports = free_ports(n)
        self.procs: list[subprocess.Popen[bytes]] = []
        peers = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        for i, port in enumerate(self.ports):
            log = (log_dir / f"bench-n{n}-{'-'.join(extra) or 'default'}-{i}.log").open("wb")
            cmd = [
                sys.executable,
                "-m",
                "exo_stable",
                "serve",
                "--port",
                str(port),
                "--node-id",
                f"b{n}{''.join(extra).replace('-', '')}-{i}",
                "--no-discovery",
                "--dtype",
                dtype,
                "--max-concurrent",
                "16",
                *extra,
            ]
            if n > 1:
                cmd += ["--peers", peers]
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        self.n = n

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 600) -> None:  # noqa: ASYNC109
        await wait_for_plan(session, self.ports, self.procs, timeout)

    def stop(self) -> None:
        stop_all(self.procs, timeout=30)


async def one_stream(session: aiohttp.ClientSession, port: int, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = None
    tokens = 0
    async for event in sse_events(session, f"http://127.0.0.1:{port}/v1/chat/completions", body):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
    assert first is not None and last is not None and tokens > 1
    return {
        "ttft_s": first - started,
        "decode_tok_s": (tokens - 1) / max(last - first, 1e-9),
        "tokens": tokens,
        "total_s": last - started,
    }


async def measure(n: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    cluster = Cluster(n, args.dtype, log_dir)
    timeout = aiohttp.ClientTimeout(total=1800)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await cluster.wait_ready(session)
            port = cluster.ports[0]
            await one_stream(session, port, PROMPTS[0], 8)  # warm-up
            singles = [
                await one_stream(session, port, PROMPTS[i % len(PROMPTS)], args.max_tokens) for i in range(args.repeats)
            ]
            row: dict[str, Any] = {
                "nodes": n,
                "ttft_s": round(statistics.median(s["ttft_s"] for s in singles), 4),
                "decode_tok_s": round(statistics.median(s["decode_tok_s"] for s in singles), 2),
                "concurrency": {},
            }
            for c in args.concurrency:
                started = time.perf_counter()
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(
                            one_stream(session, cluster.ports[i % n], PROMPTS[i % len(PROMPTS)], args.max_tokens)
                        )
                        for i in range(c)
                    ]
                elapsed = time.perf_counter() - started
                total = sum(t.result()["tokens"] for t in tasks)
                row["concurrency"][str(c)] = round(total / elapsed, 2)
            return row
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="exo-bench-") as tmp:
        for n in args.nodes:
            row = asyncio.run(measure(n, args, Path(tmp)))
            rows.append(row)
    base = next((r for r in rows if r["nodes"] == 1), None)
    print(f"{'nodes':>5} {'ttft s':>8} {'decode tok/s':>13} {'ratio':>6}  aggregate tok/s by concurrency")
    for row in rows:
        row["ratio_to_single"] = round(row["decode_tok_s"] / base["decode_tok_s"], 3) if base else None
        agg = "  ".join(f"{c}:{v}" for c, v in row["concurrency"].items())
        print(
            f"{row['nodes']:>5} {row['ttft_s']:>8.3f} {row['decode_tok_s']:>13.2f} "
            f"{row['ratio_to_single'] if row['ratio_to_single'] is not None else '-':>6}  {agg}"
        )
    report = {
        "benchmark": "cluster",
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {RESULTS / 'cluster.json'}")


if __name__ == "__main__":
    main()
