"""exo-stable on a GPU: one device against mlx-lm, then the model split into two node processes.

    python benchmarks/bench_gpu.py [--shape llama-3-8b] [--dtypes bfloat16 quantized] [--streams 1 4 16]

Everything runs in one go, on seeded random weights of a published shape (``random:<shape>``: nothing
to download; each process draws only the layers it holds, on its device):

1. In this process, per dtype: mlx-lm's own ``stream_generate`` on the same weights (the baseline a user
   would compare with), then exo-stable's single-device engine, greedy, with its one-step-ahead decode
   and with a synchronous evaluation per token. Prefill and decode tokens/s; whether the tokens agree.
2. Real node processes serving the OpenAI API, every layout running at once: one node holding the whole
   model (which decodes greedy requests a step ahead), the same with ``--no-decode-ahead`` (single streams
   only), and two nodes holding half the layers each (on two GPUs when there are two, else both on the one
   GPU), the same split with ``--no-build-ahead`` too. Single-stream decode tokens/s through the API and the
   ratio split / single; where one decode step's time went, from the request's trace (each stage's forward
   call, its hand-off, the wire between stages);
   aggregate tokens/s with 1, 4 and 16 concurrent streams; whether every split answer is identical to the
   single node's (text and token count).

Figures are medians of ``--repeats`` rounds in which the contenders alternate, mlx-lm and exo-stable in
process, the node layouts through the API (GPU clocks and neighbours move figures
between runs; alternating keeps the comparison fair).

Prints a table and saves benchmarks/results/gpu.json (``--out``). On a CPU-only machine,
``--shape tiny --device cpu`` runs the same code path in seconds (that is how CI keeps it working).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import mlx.core as mx
from mlx import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodeprocs import free_ports, sse_events, stop_all, wait_for_plan  # noqa: E402

from exo_stable import eventloop  # noqa: E402
from exo_stable.engine import device as devices  # noqa: E402
from exo_stable.engine import random_model  # noqa: E402
from exo_stable.engine.loader import open_model  # noqa: E402
from exo_stable.engine.modelspec import Dtype  # noqa: E402
from exo_stable.engine.sampling import SamplingParams  # noqa: E402
from exo_stable.engine.single import SingleDeviceEngine  # noqa: E402
from exo_stable.pipeline.trace import decode_breakdown  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def prompt_text(n: int, seed: int) -> str:
    """``n`` ASCII characters of word-like text (the synthetic tokenizer makes one token per byte)."""
    rng = random.Random(seed)
    words = []
    length = 0
    while length < n:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:n]


# ------------------------------------------------------------------------------------------- in process


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


class MlxLmBaseline:
    """mlx-lm's model and ``stream_generate`` on exactly the weights exo-stable draws."""

    def __init__(self, name: str, dtype: Dtype) -> None:
        from mlx_lm.models import llama
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        source = open_model(name)
        assert source.random is not None
        self.model = llama.Model(llama.ModelArgs.from_dict(source.spec.mlx_lm_args()))
        quantized = dtype is Dtype.QUANTIZED
        if quantized:
            q = random_model.QUANT
            nn.quantize(self.model, group_size=q.group_size, bits=q.bits)
        weights, _ = random_model.generate(
            source.random, random_model.tensor_shapes(source.spec), dtype=mx.bfloat16, quantize=quantized
        )
        self.model.load_weights(list(weights.items()), strict=True)
        mx.eval(self.model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            source.tokenizer.save_hf_dir(Path(tmp))
            self.tokenizer = load_tokenizer(Path(tmp))

    def run(self, prompt: list[int], n: int) -> dict[str, Any]:
        from mlx_lm.generate import stream_generate

        tokens: list[int] = []
        stamps: list[float] = []
        prompt_tps = gen_tps = 0.0
        for response in stream_generate(self.model, self.tokenizer, prompt=prompt, max_tokens=n):
            tokens.append(int(response.token))
            stamps.append(time.perf_counter())
            prompt_tps, gen_tps = response.prompt_tps, response.generation_tps
        wall = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        return {"prefill_tok_s": prompt_tps, "decode_tok_s": gen_tps, "decode_tok_s_wall": wall, "tokens": tokens}


async def engine_once(
    engine: SingleDeviceEngine, prompt: list[int], n: int, lookahead: bool, depth: int | None = None
) -> dict[str, Any]:
    default_depth = engine.lookahead_depth
    engine.lookahead, engine.lookahead_depth = lookahead, depth or default_depth
    started = time.perf_counter()
    stamps: list[float] = []
    tokens: list[int] = []
    async for token in engine.generate(prompt, GREEDY, n):
        tokens.append(token)
        stamps.append(time.perf_counter())
    prefill = len(prompt) / (stamps[0] - started)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    engine.lookahead_depth = default_depth
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "tokens": tokens}


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in runs[0] if k != "tokens"]
    return {k: round(statistics.median(r[k] for r in runs), 1) for k in keys}


async def single_device(name: str, dtype: Dtype, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Alternate mlx-lm, exo-stable one step ahead, and exo-stable synchronous, ``--repeats`` rounds."""
    baseline = MlxLmBaseline(name, dtype)
    engine = SingleDeviceEngine(open_model(name), dtype=dtype, max_requests=4)
    await engine.start()
    other_depth = 1 if engine.lookahead_depth != 1 else 2
    runs: dict[str, list[dict[str, Any]]] = {
        "mlx_lm": [],
        "exo_stable": [],
        f"exo_stable_depth{other_depth}": [],
        "exo_stable_sync": [],
    }
    try:
        baseline.run(prompt, 8)  # warm-up: kernels compile on first use
        await engine_once(engine, prompt, 8, lookahead=True)
        await engine_once(engine, prompt, 8, lookahead=False)
        for _ in range(args.repeats):
            runs["mlx_lm"].append(baseline.run(prompt, args.decode_tokens))
            runs["exo_stable"].append(await engine_once(engine, prompt, args.decode_tokens, lookahead=True))
            runs[f"exo_stable_depth{other_depth}"].append(
                await engine_once(engine, prompt, args.decode_tokens, lookahead=True, depth=other_depth)
            )
            runs["exo_stable_sync"].append(await engine_once(engine, prompt, args.decode_tokens, lookahead=False))
    finally:
        engine.close()
    ours = [r["tokens"] for who, rs in runs.items() if who != "mlx_lm" for r in rs]
    theirs = runs["mlx_lm"][0]["tokens"]
    row: dict[str, Any] = {who: medians(r) for who, r in runs.items()}
    row["lookahead_depth"] = engine.lookahead_depth
    row["decode_ratio_to_mlx_lm"] = round(row["exo_stable"]["decode_tok_s"] / row["mlx_lm"]["decode_tok_s"], 3)
    # Every exo-stable run (one step ahead or synchronous, every round) must give the same tokens.
    row["exo_stable_repeatable"] = all(t == ours[0] for t in ours)
    row["exo_stable_first_difference"] = next((first_difference(ours[0], t) for t in ours if t != ours[0]), None)
    row["mlx_lm_first_difference"] = first_difference(theirs, ours[0])
    return row


# ------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Layout:
    """One way to serve the model: node i holds ``splits[i]`` layers on GPU ``gpus[i]``."""

    label: str
    splits: list[int]
    gpus: list[int | None]
    flags: tuple[str, ...] = ()
    aggregate: bool = True  # also measure concurrent streams


class Nodes:
    """``len(splits)`` node processes serving ``name``; node i holds ``splits[i]`` layers."""

    def __init__(self, name: str, dtype: Dtype, layout: Layout, log_dir: Path) -> None:
        splits, gpus = layout.splits, layout.gpus
        self.ports = free_ports(len(splits))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        peers = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        for i, port in enumerate(self.ports):
            log = log_dir / f"node-{layout.label}-{i}.log"
            self.logs.append(log)
            cmd = [sys.executable, "-m", "exo_stable", "serve", "--model", name, "--dtype", dtype.value]
            cmd += ["--port", str(port), "--node-id", f"{layout.label}-{i}", "--no-discovery"]
            cmd += ["--max-concurrent", "16", "--device", devices.chosen().value, *layout.flags]
            if gpus[i] is not None:
                cmd += ["--gpu", str(gpus[i])]
            if len(splits) > 1:
                cmd += ["--peers", peers, "--split", ",".join(map(str, splits))]
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
        self.n = len(splits)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float) -> None:  # noqa: ASYNC109
        await wait_for_plan(session, self.ports, self.procs, timeout, self.logs)

    def stop(self) -> None:
        stop_all(self.procs)


async def stream_once(session: aiohttp.ClientSession, port: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    tokens = 0
    request_id = ""
    async for event in sse_events(session, f"http://127.0.0.1:{port}/v1/completions", body):
        request_id = event.get("id", request_id)
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0].get("text"):
            stamps.append(time.perf_counter())
            text.append(event["choices"][0]["text"])
    assert stamps and tokens > 1, "no tokens came back"
    # Text events can carry more than one token (a character split across tokens); rate from the counts.
    return {
        "ttft_s": stamps[0] - started,
        "decode_tok_s": (tokens - 1) / max(stamps[-1] - stamps[0], 1e-9),
        "tokens": tokens,
        "text": "".join(text),
        "id": request_id,
    }


async def step_breakdown(session: aiohttp.ClientSession, port: int, request_id: str) -> dict[str, Any] | None:
    """Where the request's decode steps spent their time, from its trace (``None`` if it has none)."""
    async with session.get(f"http://127.0.0.1:{port}/v1/traces/{request_id}") as resp:
        if resp.status != 200:
            return None
        trace = await resp.json()
    return decode_breakdown(trace["step_records"])


async def measure_clusters(args: argparse.Namespace, layouts: list[Layout], log_dir: Path) -> list[dict[str, Any]]:
    """Every layout's node processes at once; single-stream rounds alternate between them (GPU clocks and
    neighbours drift: alternating lays the drift on all of them alike), then each one's concurrent streams."""
    clusters = [Nodes(args.model, Dtype(args.split_dtype), layout, log_dir) for layout in layouts]
    timeout = aiohttp.ClientTimeout(total=1800)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for nodes in clusters:
                await nodes.wait_ready(session, args.ready_timeout)
                await stream_once(session, nodes.ports[0], prompt_text(64, 0), 8)  # warm-up
            singles: list[list[dict[str, Any]]] = [[] for _ in clusters]
            for i in range(args.repeats):
                for nodes, runs in zip(clusters, singles, strict=True):
                    prompt = prompt_text(args.prompt_tokens, 100 + i)
                    runs.append(await stream_once(session, nodes.ports[0], prompt, args.decode_tokens))
            rows = []
            for layout, nodes, runs in zip(layouts, clusters, singles, strict=True):
                answers = {f"single/{i}": [r["text"], r["tokens"]] for i, r in enumerate(runs)}
                row: dict[str, Any] = {
                    "layout": layout.label,
                    "nodes": len(layout.splits),
                    "split": layout.splits,
                    "gpus": layout.gpus,
                    "flags": list(layout.flags),
                    "ttft_s": round(statistics.median(s["ttft_s"] for s in runs), 4),
                    "decode_tok_s": round(statistics.median(s["decode_tok_s"] for s in runs), 1),
                    "decode_tok_s_rounds": [round(s["decode_tok_s"], 1) for s in runs],
                    "breakdown": await step_breakdown(session, nodes.ports[0], runs[-1]["id"]),
                    "aggregate_tok_s": await aggregate(session, nodes, args, answers) if layout.aggregate else {},
                    "answers": answers,
                }
                rows.append(row)
            return rows
    finally:
        for nodes in clusters:
            nodes.stop()


async def aggregate(
    session: aiohttp.ClientSession, nodes: Nodes, args: argparse.Namespace, answers: dict[str, Any]
) -> dict[str, float]:
    """Aggregate tokens/s with each count of concurrent streams (spread over the nodes' APIs)."""
    out: dict[str, float] = {}
    for c in args.streams:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(
                    stream_once(
                        session, nodes.ports[i % nodes.n], prompt_text(args.prompt_tokens, i), args.decode_tokens
                    )
                )
                for i in range(c)
            ]
        elapsed = time.perf_counter() - started
        results = [t.result() for t in tasks]
        out[str(c)] = round(sum(r["tokens"] for r in results) / elapsed, 1)
        for i, r in enumerate(results):
            answers[f"{c}/{i}"] = [r["text"], r["tokens"]]
    return out


def describe_breakdown(b: dict[str, Any]) -> str:
    stages = "; ".join(
        f"stage {st['stage']} compute {st['compute_ms']} + handoff {st['handoff_ms']}" for st in b["stages"]
    )
    return f"{b['step_ms']} per token = {stages}; wire {' + '.join(str(w) for w in b['wire_ms'])}"


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(random_model.SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "quantized"])
    parser.add_argument("--split-dtype", default="bfloat16", help="dtype of the node-process runs")
    parser.add_argument("--device", choices=["cpu", "gpu"], help="default: the best available")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--skip-nodes", action="store_true", help="only the in-process measurements")
    parser.add_argument("--skip-single", action="store_true", help="only the node-process measurements")
    parser.add_argument("--log-dir", type=Path, help="keep the node processes' logs here")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args()
    args.model = f"{random_model.PREFIX}{args.shape}" + (f"@{args.seed}" if args.seed else "")

    kind = devices.resolve(args.device)
    devices.choose(kind)
    devices.activate(kind)
    info = {k: v for k, v in mx.device_info().items() if isinstance(v, int | float | str)} if kind == "gpu" else {}
    gpus = devices.gpu_count() if kind == "gpu" else 0
    print(f"device: {devices.describe(kind)}; GPUs visible: {gpus}; mlx {mx.__version__}; model {args.model}")
    started = time.perf_counter()

    source = open_model(args.model)
    prompt = source.tokenizer.encode(prompt_text(args.prompt_tokens, 1))
    single: dict[str, Any] = {}
    for name in [] if args.skip_single else args.dtypes:
        single[name] = asyncio.run(single_device(args.model, Dtype(name), prompt, args))
        gc.collect()  # one dtype's models go before the next's come
        mx.clear_cache()
        print(json.dumps({name: single[name]}), flush=True)

    nodes: list[dict[str, Any]] = []
    if not args.skip_nodes:
        layers = source.spec.num_hidden_layers
        half = [layers // 2, layers - layers // 2]
        two_gpus: list[int | None] = [0, 1] if gpus >= 2 else [None, None]
        with tempfile.TemporaryDirectory(prefix="exo-gpu-bench-") as tmp:
            log_dir = args.log_dir or Path(tmp)
            log_dir.mkdir(parents=True, exist_ok=True)
            one_gpu: list[int | None] = [0 if gpus else None]
            layouts = [
                Layout("one", [layers], one_gpu),
                # The same node waiting for each token before queuing the next step: what decoding ahead gains.
                Layout("one-sync", [layers], one_gpu, ("--no-decode-ahead",), aggregate=False),
                Layout("split", half, two_gpus),
                # The same split building each step's graph only when its input comes: what building ahead gains.
                Layout("split-no-build-ahead", half, two_gpus, ("--no-build-ahead",)),
            ]
            nodes = asyncio.run(measure_clusters(args, layouts, log_dir))
    report: dict[str, Any] = {
        "host": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": devices.describe(kind),
        "device_info": info,
        "gpus": gpus,
        "model": args.model,
        "event_loop": eventloop.resolve(),
        "prompt_tokens": len(prompt),
        "decode_tokens": args.decode_tokens,
        "single_device": single,
        "wall_s": 0.0,
    }
    if nodes:
        one, sync, two, unbuilt = nodes
        same = one["answers"] == two["answers"] and all(
            one["answers"][k] == v for row in (sync, unbuilt) for k, v in row["answers"].items()
        )
        report["nodes"] = [{k: v for k, v in row.items() if k != "answers"} for row in nodes]
        report["split_ratio"] = round(two["decode_tok_s"] / one["decode_tok_s"], 3)
        report["split_ratio_to_sync_node"] = round(two["decode_tok_s"] / sync["decode_tok_s"], 3)
        report["decode_ahead_gain"] = round(one["decode_tok_s"] / sync["decode_tok_s"], 3)
        report["build_ahead_gain"] = round(two["decode_tok_s"] / unbuilt["decode_tok_s"], 3)
        report["split_identical"] = same
        report["split_answers_compared"] = len(one["answers"]) + len(sync["answers"]) + len(unbuilt["answers"])
    report["wall_s"] = round(time.perf_counter() - started, 1)

    print()
    print(f"{'single device':<26} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, row in single.items():
        for who in [k for k, v in row.items() if isinstance(v, dict)]:
            print(f"{name + ' ' + who:<26} {row[who]['prefill_tok_s']:>14} {row[who]['decode_tok_s']:>13}")
        print(
            f"{name}: exo-stable / mlx-lm decode = {row['decode_ratio_to_mlx_lm']}; exo-stable runs bit-identical "
            f"(queued ahead and synchronous, {args.repeats} rounds): {row['exo_stable_repeatable']}; "
            f"first token differing from mlx-lm: {row['mlx_lm_first_difference']}"
        )
    for row in report.get("nodes", []):
        agg = "  ".join(f"{c}:{v}" for c, v in row["aggregate_tok_s"].items())
        print(
            f"{row['layout']}: {row['nodes']} node(s) split {row['split']} gpus {row['gpus']} "
            f"{' '.join(row['flags'])}: ttft {row['ttft_s']} s, "
            f"decode {row['decode_tok_s']} tok/s; aggregate by streams {agg}"
        )
        if row.get("breakdown"):
            print(f"  one decode step (medians, ms): {describe_breakdown(row['breakdown'])}")
    if nodes:
        print(
            f"split / single decode ratio: {report['split_ratio']} (to the node waiting for each token: "
            f"{report['split_ratio_to_sync_node']}; decoding ahead gains {report['decode_ahead_gain']}x; "
            f"building the split's steps ahead gains {report['build_ahead_gain']}x); "
            f"answers identical to the single node: {report['split_identical']} "
            f"({report['split_answers_compared']} answers)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out} in {report['wall_s']} s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
