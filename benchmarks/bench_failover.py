"""Failover stall on namespaces: what a stream's longest pause around a fault is made of.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python benchmarks/bench_failover.py \
        [--runs 5] [--faults kill partition sigstop] [--model PATH] [--label before] [--node-arg=--flag ...] \
        [--log-dir DIR] [--baseline-tree DIR]

Three machines (network namespaces on a bridge, tests/netns.py), each running ``exo-stable serve --host
0.0.0.0`` on the default model, nodes 1 and 2 joined through node 0 (which leads and owns the requests).
Per run: a fresh cluster, a greedy streamed answer through node 0, and after 8 deltas the fault:

- ``kill``: SIGKILL of the last stage (node 2);
- ``partition``: the middle stage's link (node 1) goes down (the switch side of its veth), healed after;
- ``sigstop``: the last stage is frozen for ``--stop-seconds`` (shorter than the failure timeout) and then
  continued: it must not cause a re-plan (``false_replans`` counts runs that did).

The stall is the client's longest gap between two deltas. Its parts, from node 0's log (wall clock, one
host) and the client's monotonic clock: ``detect`` (fault → the owner sees the pipeline fail), ``replan``
(→ the leader proposes the new plan), ``load`` (→ the plan is committed: the survivors loaded their new
layers), ``replay`` (→ the next new token reaches the client). Every answer is compared with the
uninterrupted one. Prints p50/p99 per fault and part; saves benchmarks/results/failover[-LABEL].json.

``--baseline-tree DIR`` compares two versions of the code under the same conditions: every run is made
twice, back to back, once with the nodes running DIR's code (e.g. ``git worktree add --detach DIR HEAD~1``)
and once with this tree's; the baseline's figures go to failover[-LABEL]-baseline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from netns import PORT, Cluster, Fabric, Stream, unavailable  # noqa: E402

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)
RECOVERING = re.compile(r"^(\S+ \S+) WARNING \S+: request \S+: .*recovering", re.M)
PROPOSING = re.compile(r"^(\S+ \S+) INFO \S+: \S+: proposing plan (\d+)", re.M)
COMMITTED = re.compile(r"^(\S+ \S+) INFO \S+: \S+: plan (\d+) committed", re.M)
BODY: dict[str, Any] = {
    "model": "default",
    "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
    "max_tokens": 64,
    "temperature": 0,
}


def _wall(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


@contextlib.contextmanager
def source_tree(tree: Path) -> Iterator[None]:
    """Node processes started inside run the code of ``tree`` (``python -m`` looks in the working directory
    first, then PYTHONPATH)."""
    cwd, path = Path.cwd(), os.environ.get("PYTHONPATH")
    os.chdir(tree)
    os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        os.chdir(cwd)
        if path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path


def one_run(
    fabric: Fabric, fault: str, args: argparse.Namespace, reference: str | None, log_dir: Path, *, tree: Path = ROOT
) -> dict[str, Any]:
    base = ("--cluster-secret", "bench", "--no-discovery", *args.node_args)
    if args.model:
        base = (*base, "--model", args.model)
    seed = ("--peers", f"{fabric.addr(0)}:{PORT}")
    with source_tree(tree):
        cluster = Cluster.start(fabric, log_dir, [base, (*base, *seed), (*base, *seed)])
    with cluster:
        fabric.wait_plan(cluster.ids, [0, 1, 2], 300)
        if reference is None:
            stream = Stream(fabric, 0, BODY)
            reference = stream.result(300)["text"]
            stream.close()
        epoch_before = fabric.get(f"{fabric.url(0)}/v1/cluster")[1]["plan"]["epoch"]
        stream = Stream(fabric, 0, BODY)
        victim = {"kill": 2, "partition": 1, "sigstop": 2}[fault]
        try:
            stream.wait_deltas(8, 300)
            # Wall and monotonic clocks, read together, map log stamps onto the client's clock.
            fault_m, offset = time.monotonic(), time.time() - time.monotonic()
            if fault == "kill":
                cluster.nodes[victim].kill(signal.SIGKILL)
            elif fault == "partition":
                fabric.partition(victim)
            else:
                cluster.nodes[victim].kill(signal.SIGSTOP)
                time.sleep(args.stop_seconds)  # the fault itself: a node frozen this long
                cluster.nodes[victim].kill(signal.SIGCONT)
            result = stream.result(300)
        finally:
            stream.close()
            if fault == "partition":
                fabric.heal(victim)
        log = cluster.nodes[0].log(tail=1 << 22)
        epoch_after = fabric.get(f"{fabric.url(0)}/v1/cluster")[1]["plan"]["epoch"]
    deltas = [e for e in stream.lines if "delta" in e]
    before = [e["m"] for e in deltas if e["m"] <= fault_m]
    after = [e["m"] for e in deltas if e["m"] > fault_m]
    last, nxt = (before[-1] if before else fault_m), (after[0] if after else None)
    row: dict[str, Any] = {
        "fault": fault,
        "identical": result.get("text") == reference,
        "stall_s": None if nxt is None else round(nxt - last, 3),
        "replanned": epoch_after != epoch_before,
    }
    to_m = lambda stamp: _wall(stamp) - offset  # noqa: E731
    recovering = [to_m(m.group(1)) for m in RECOVERING.finditer(log) if to_m(m.group(1)) >= fault_m - 0.01]
    proposing = [(to_m(m.group(1)), int(m.group(2))) for m in PROPOSING.finditer(log)]
    committed = [(to_m(m.group(1)), int(m.group(2))) for m in COMMITTED.finditer(log)]
    if recovering and nxt is not None:
        detect = recovering[0]
        prop = next((t for t, e in proposing if t >= fault_m - 0.01 and e > epoch_before), None)
        epoch = next((e for t, e in proposing if t >= fault_m - 0.01 and e > epoch_before), None)
        done = next((t for t, e in committed if e == epoch), None)
        row["detect_s"] = round(detect - fault_m, 3)
        if prop is not None and done is not None:
            row["replan_s"] = round(max(prop - detect, 0.0), 3)
            row["load_s"] = round(done - prop, 3)
            row["replay_s"] = round(nxt - max(done, detect), 3)
    return row | {"reference": reference}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--faults", nargs="+", default=["kill", "partition", "sigstop"])
    parser.add_argument("--model", help="default: SmolLM2-135M")
    parser.add_argument("--stop-seconds", type=float, default=1.0, help="how long sigstop freezes the stage")
    parser.add_argument("--label", default="", help="saved as failover-LABEL.json")
    parser.add_argument("--node-arg", dest="node_args", action="append", default=[], help="extra serve argument")
    parser.add_argument("--log-dir", type=Path, help="keep the nodes' logs here (default: a temporary directory)")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="another checkout (e.g. a git worktree of the commit before a change): each run is made on its code "
        "too, alternating with this tree's, and saved as failover-LABEL-baseline.json",
    )
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"bench_failover: {reason}", file=sys.stderr)
        return 2
    fabric = Fabric.create(3)
    trees = {"": ROOT} if args.baseline_tree is None else {"baseline": args.baseline_tree.resolve(), "": ROOT}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    reference: str | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="exo-failover-") as tmp:
            log_dir = args.log_dir or Path(tmp)
            log_dir.mkdir(parents=True, exist_ok=True)
            for fault in args.faults:
                for run in range(args.runs):
                    for name, tree in trees.items():
                        row = one_run(fabric, fault, args, reference, log_dir, tree=tree)
                        reference = row.pop("reference")
                        rows[name].append(row | {"run": run})
                        print(json.dumps(rows[name][-1] | ({"tree": name} if name else {})), flush=True)
    finally:
        fabric.close()
    for name, tree in trees.items():
        label = "-".join(part for part in (args.label, name) if part)
        save(args, rows[name], label, tree)
    return 0


def save(args: argparse.Namespace, rows: list[dict[str, Any]], label: str, tree: Path) -> None:
    """Print p50/p99 per fault and part; save failover[-LABEL].json."""
    summary: dict[str, Any] = {}
    print(f"code of {tree}:")
    for fault in args.faults:
        mine = [r for r in rows if r["fault"] == fault]
        part = {}
        for key in ("stall_s", "detect_s", "replan_s", "load_s", "replay_s"):
            values = [r[key] for r in mine if r.get(key) is not None]
            part[key] = {"p50": _quantile(values, 0.5), "p99": _quantile(values, 0.99), "n": len(values)}
        part["identical"] = sum(r["identical"] for r in mine)
        part["runs"] = len(mine)
        part["replans"] = sum(r["replanned"] for r in mine)
        summary[fault] = part
        cells = "  ".join(
            f"{k.removesuffix('_s')} {v['p50']}/{v['p99']}" for k, v in part.items() if isinstance(v, dict)
        )
        print(f"{fault:10s} p50/p99 s: {cells}  identical {part['identical']}/{len(mine)}  re-plans {part['replans']}")
    out = ROOT / "benchmarks" / "results" / (f"failover-{label}.json" if label else "failover.json")
    out.write_text(
        json.dumps(
            {
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "model": args.model or "SmolLM2-135M (default)",
                "node_args": args.node_args,
                "stop_seconds": args.stop_seconds,
                "code": "baseline tree" if tree != ROOT else "this tree",
                "summary": summary,
                "runs": rows,
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    raise SystemExit(main())
