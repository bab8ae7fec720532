"""Memory of a model split over three node processes, each with a budget too small for the whole model.

Writes a random-weight llama model as an MLX safetensors directory (bfloat16, sharded, with an index) and as
a Q8_0 GGUF, each sized so that its file takes ``--gb`` (default 4 GiB), in a temporary directory (the disk
is checked first; the GGUF's codes and scales are drawn directly, never quantized from floats). For each
format:

1. one node with the per-node ``--memory-gb`` must refuse the model, naming what each node needs and has;
2. three nodes with that budget load it; each node's peak RSS (``VmHWM``) once the plan is loaded, and its
   RSS and peak after 64 greedy tokens, are read from /proc and set against its share (the bytes of its
   stage's tensors in the serving dtype);
3. one node with no budget runs the whole model: its answer must equal the split answer token for token.

Goal: every node's peak <= 1.15 x share + 300 MB. Prints a table and writes benchmarks/results/memory.json.
``tests/test_bench_memory.py`` runs the same code on a ~300 MB model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nodeprocs import free_ports, stop_all, wait_for_plan

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype, ModelSpec
from exo_stable.engine.store import ensure_default_model
from exo_stable.engine.synthetic import llama_spec
from exo_stable.engine.synthetic_stream import (
    check_disk,
    model_bytes,
    tokenizer_source_metadata,
    write_gguf_stream,
    write_mlx_stream,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MB = 1 << 20
PROMPT = "Write a long story about a lighthouse keeper and the sea."
TOKENS = 64
MAX_CONTEXT = 512  # placement's KV reserve: one request of 512 tokens


@dataclass
class NodeMemory:
    format: str
    node: str
    layers: str
    share_mb: float
    load_peak_mb: float
    steady_mb: float
    peak_mb: float
    ratio: float
    goal_mb: float
    ok: bool


BYTES_PER_PARAM = {"mlx": 2.0, "gguf": 34 / 32}  # bfloat16; Q8_0: a float16 scale and 32 int8 per block


def shape_for(gigabytes: float, bytes_per_param: float = 2.0) -> ModelSpec:
    """A llama shape whose weights take about ``gigabytes`` GiB at ``bytes_per_param`` (hidden 2048 from 1 GiB
    up, else 512)."""
    hidden, inter, heads, kv = (2048, 5632, 16, 4) if gigabytes >= 1 else (512, 1408, 8, 4)
    base = llama_spec(layers=1, hidden=hidden, intermediate=inter, heads=heads, kv_heads=kv, vocab=49152)
    one = model_bytes(base, bytes_per_param)
    two = model_bytes(
        llama_spec(layers=2, hidden=hidden, intermediate=inter, heads=heads, kv_heads=kv, vocab=49152), bytes_per_param
    )
    per_layer, fixed = two - one, 2 * one - two
    layers = max(3, -(-(int(gigabytes * 2**30) - fixed) // per_layer))
    return llama_spec(layers=layers, hidden=hidden, intermediate=inter, heads=heads, kv_heads=kv, vocab=49152)


def _status(pid: int, key: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def _node_cmd(
    model: Path, port: int, node_id: str, dtype: str, *, memory_gb: float | None, peers: str | None
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "exo_stable",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--node-id",
        node_id,
    ]
    cmd += ["--no-discovery", "--dtype", dtype, "--max-concurrent", "1", "--max-context", str(MAX_CONTEXT)]
    if memory_gb is not None:
        cmd += ["--memory-gb", f"{memory_gb:.4f}"]
    if peers:
        cmd += ["--peers", peers]
    return cmd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("EXO_STABLE_PEERS", None)
    env.pop("EXO_STABLE_API_KEY", None)
    return env


def _start(cmds: Sequence[list[str]], logs: Sequence[Path]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for cmd, log in zip(cmds, logs, strict=True):
        with log.open("wb") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env()))
    return procs


async def _greedy(session: aiohttp.ClientSession, port: int) -> list[str]:
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "logprobs": 0}
    async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"completion failed: {data}")
    choice = data["choices"][0]
    tokens: list[str] = choice["logprobs"]["tokens"]
    if not tokens:
        raise RuntimeError(f"no token generated ({choice.get('finish_reason')})")
    return tokens


def refusal(model: Path, dtype: str, memory_gb: float, log: Path, timeout: float) -> str:
    """Start one node with the per-node budget; return the lines where it refuses the model."""
    (port,) = free_ports(1)
    (proc,) = _start([_node_cmd(model, port, f"m{port}-solo", dtype, memory_gb=memory_gb, peers=None)], [log])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "cannot place" in text:
                time.sleep(0.2)  # the refusal's per-node lines follow its first line in the same write
                text = log.read_text(errors="replace")
                start = text.index("cannot place")
                return "\n".join(text[start:].splitlines()[:3])
            if proc.poll() is not None:
                return f"node exited with {proc.returncode}: {text[-1500:]}"
            time.sleep(0.5)  # polling another process's log
        raise TimeoutError(f"the single node did not refuse the model within {timeout}s: {log.read_text()[-1500:]}")
    finally:
        stop_all([proc], timeout=20)


async def split_run(
    model: Path, fmt: str, dtype: str, *, memory_gb: float, workdir: Path, timeout_s: float
) -> tuple[list[NodeMemory], list[str]]:
    ports = free_ports(3)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    ids = [f"m{ports[0]}-{i}" for i in range(3)]
    logs = [workdir / f"{fmt}-{i}.log" for i in range(3)]
    procs = _start(
        [_node_cmd(model, p, n, dtype, memory_gb=memory_gb, peers=peers) for p, n in zip(ports, ids, strict=True)], logs
    )
    source = open_model(model)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            await wait_for_plan(session, ports, procs, timeout_s, logs)
            load_peak = [_status(p.pid, "VmHWM") for p in procs]
            async with session.get(f"http://127.0.0.1:{ports[0]}/v1/cluster") as r:
                stages = (await r.json())["plan"]["stages"]
            tokens = await _greedy(session, ports[0])
            steady = [_status(p.pid, "VmRSS") for p in procs]
            peak = [_status(p.pid, "VmHWM") for p in procs]
    finally:
        stop_all(procs, timeout=30)
    footprint = source.footprint(Dtype(dtype), kv_tokens=0)
    rows = []
    for i, stage in enumerate(stages):
        node = ids.index(stage["node_id"])
        share = footprint.stage_bytes(i, len(stages), stage["end"] - stage["start"]) / MB
        goal = 1.15 * share + 300
        rows.append(
            NodeMemory(
                format=fmt,
                node=stage["node_id"],
                layers=f"[{stage['start']},{stage['end']})",
                share_mb=round(share, 1),
                load_peak_mb=round(load_peak[node], 1),
                steady_mb=round(steady[node], 1),
                peak_mb=round(peak[node], 1),
                ratio=round(peak[node] / share, 3),
                goal_mb=round(goal, 1),
                ok=peak[node] <= goal,
            )
        )
    return rows, tokens


async def whole_run(model: Path, fmt: str, dtype: str, workdir: Path, timeout_s: float) -> tuple[list[str], float]:
    (port,) = free_ports(1)
    log = workdir / f"{fmt}-whole.log"
    (proc,) = _start([_node_cmd(model, port, f"m{port}-whole", dtype, memory_gb=None, peers=None)], [log])
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            await wait_for_plan(session, [port], [proc], timeout_s, [log])
            tokens = await _greedy(session, port)
            return tokens, _status(proc.pid, "VmHWM")
    finally:
        stop_all([proc], timeout=30)


def run(
    gigabytes: float,
    workdir: Path,
    *,
    timeout: float = 1800,
    formats: Sequence[str] = ("mlx", "gguf"),
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Write the model, measure both formats, and return the results (the CI test calls this too).
    ``progress`` gets the results so far after each split run (a failed whole-model run keeps them)."""
    specs = {fmt: shape_for(gigabytes, BYTES_PER_PARAM[fmt]) for fmt in formats}
    check_disk(workdir, sum(model_bytes(spec, BYTES_PER_PARAM[fmt]) for fmt, spec in specs.items()))
    tok = tokenizer_source_metadata(ensure_default_model(progress=False))
    out: dict[str, Any] = {
        "machine": platform.machine(),
        "system": platform.system(),
        "goal": "peak RSS <= 1.15 x share + 300 MB on every node",
        "tokens": TOKENS,
        "formats": {},
    }
    for fmt, spec in specs.items():
        # One format on disk at a time: the next is written once this one's runs are over.
        started = time.monotonic()
        if fmt == "mlx":
            model, dtype = write_mlx_stream(workdir / "mlx", spec, tok, shard_bytes=512 * MB), "bfloat16"
        else:
            model, dtype = write_gguf_stream(workdir / "model.Q8_0.gguf", spec, tok, kind="Q8_0"), "quantized"
        write_s = time.monotonic() - started
        source = open_model(model)
        whole = source.footprint(Dtype(dtype), kv_tokens=MAX_CONTEXT)
        whole_bytes = whole.stage_bytes(0, 1, whole.n_layers)
        # Each node offers 45% of the whole: no node can hold it, three can.
        memory_gb = 0.45 * whole_bytes / 2**30
        refused = refusal(model, dtype, memory_gb, workdir / f"{fmt}-solo.log", timeout=min(timeout, 300))
        rows, split_tokens = asyncio.run(
            split_run(model, fmt, dtype, memory_gb=memory_gb, workdir=workdir, timeout_s=timeout)
        )
        if progress is not None:
            progress(out | {"partial": {"format": fmt, "refusal": refused, "nodes": [asdict(r) for r in rows]}})
        whole_tokens, whole_peak = asyncio.run(whole_run(model, fmt, dtype, workdir, timeout))
        out["formats"][fmt] = {
            "dtype": dtype,
            "layers": spec.num_hidden_layers,
            "hidden": spec.hidden_size,
            "write_s": round(write_s, 1),
            "file_mb": round(
                sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / MB
                if model.is_dir()
                else model.stat().st_size / MB,
                1,
            ),
            "whole_mb": round(whole_bytes / MB, 1),
            "memory_gb_per_node": round(memory_gb, 4),
            "single_node_refusal": refused,
            "nodes": [asdict(r) for r in rows],
            "split_equals_whole": split_tokens == whole_tokens,
            "whole_peak_mb": round(whole_peak, 1),
        }
        _remove(model)
    return out


def _remove(model: Path) -> None:
    if model.is_dir():
        for f in model.iterdir():
            f.unlink()
        model.rmdir()
    else:
        model.unlink()


def table(result: dict[str, Any]) -> str:
    lines = [
        "| format | node | layers | share MB | peak during load MB | steady MB | peak MB | peak / share | goal MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, data in result["formats"].items():
        for i, r in enumerate(data["nodes"]):
            lines.append(
                f"| {fmt} ({data['dtype']}) | {i} | {r['layers']} | {r['share_mb']} | {r['load_peak_mb']} | "
                f"{r['steady_mb']} | {r['peak_mb']} | {r['ratio']} | {r['goal_mb']} {'ok' if r['ok'] else 'MISSED'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=4.0, help="size of each format's model file (GiB)")
    parser.add_argument("--dir", type=Path, help="where to write the model (default: a temporary directory)")
    parser.add_argument("--formats", default="mlx,gguf")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        partial = RESULTS / "memory.partial.json"
        result = run(
            args.gb,
            Path(tmp),
            formats=args.formats.split(","),
            progress=lambda r: partial.write_text(json.dumps(r, indent=2)),
        )
        partial.unlink(missing_ok=True)
    print(table(result))
    for fmt, data in result["formats"].items():
        print(f"{fmt}: split == whole: {data['split_equals_whole']}; one node refuses: {data['single_node_refusal']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / "memory.json"
    if saved.exists():  # formats not run this time keep their last figures
        before = json.loads(saved.read_text())
        earlier = before.get("formats", {})
        for data in earlier.values():  # results saved before the shape was recorded per format
            data.setdefault("layers", before.get("layers"))
            data.setdefault("hidden", before.get("hidden"))
        result["formats"] = {**{k: v for k, v in earlier.items() if k not in result["formats"]}, **result["formats"]}
    saved.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
