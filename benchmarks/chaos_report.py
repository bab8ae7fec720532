"""Chaos report: every fault scenario of tests/test_chaos_more.py and tests/test_chaos_recovery.py, N runs each.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python benchmarks/chaos_report.py \
        [--runs 3] [--seed 7] [--only sigkill_last sigstop_last ...]

Each run starts three real node processes (default model, float32), injects its fault and streams greedy
requests owned by node 0; every answer is compared with the uninterrupted single-device answer token by
token (both texts tokenized, then aligned): tokens missing from the answer are "lost", extra ones are
"duplicated"; both must be 0. Seeded: the delta after which a stage is killed or frozen, how long it stays
frozen, and the wire-fault seed all come from ``--seed`` and the run index.

Time to resume: the owner's ``/health`` ``owner.recovery.resume_p50_s``/``resume_p99_s`` (failure seen →
the next new token accepted, replay included; per run, then the table shows the median of the p50s and the
max of the p99s), and the client-side gap: the longest wait between two deltas across the fault (for the
prefill kill: the request's start to its first token).

``replay_exact`` and ``replay_fast`` kill the last stage after 18-30 tokens of a 48-token answer, with the
request's ``exo_replay`` set: exact replay must give the reference answer; fast replay must keep the text
before the fault, and its continuation is compared with the reference (``diverged`` counts runs whose
continuation differs: allowed for fast replay, which does not promise bit-identity). Prints one table row per
fault type; saves benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_chaos_more import (  # noqa: E402  (the scenarios live with the tests)
    HEARTBEAT_TIMEOUT_S,
    WIRE_FAULTS,
    ScenarioResult,
    scenario_kill_in_prefill,
    scenario_kill_last,
    scenario_kill_middle,
    scenario_sigstop,
    scenario_wire_faults,
)
from test_chaos_recovery import (  # noqa: E402
    scenario_client_disconnect,
    scenario_crash_loop,
    scenario_kill_during_load,
    scenario_replay,
)

from exo_stable.engine.loader import open_model  # noqa: E402
from exo_stable.engine.store import ensure_default_model  # noqa: E402
from exo_stable.tokenizer import Tokenizer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ORDER = [
    "sigkill_last",
    "sigkill_middle",
    "sigkill_prefill",
    "sigkill_load",
    "sigstop_last",
    "wire_faults",
    "stage_crash_loop",
    "client_disconnect",
    "replay_exact",
    "replay_fast",
]


def token_diff(tok: Tokenizer, expected: str, got: str) -> tuple[int, int, bool]:
    """(tokens lost, tokens duplicated or extra, exact) of ``got`` against ``expected``."""
    a, b = tok.encode(expected), tok.encode(got)
    lost = extra = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            lost += i2 - i1
        if op in ("insert", "replace"):
            extra += j2 - j1
    return lost, extra, a == b


async def run_one(name: str, run: int, seed: int, log_dir: Path, gguf: Path) -> ScenarioResult:
    rng = random.Random(f"{seed}:{name}:{run}")
    after = rng.randint(3, 9)  # the delta after which the fault strikes
    if name == "sigkill_last":
        return await scenario_kill_last(log_dir, gguf, after=after)
    if name == "sigkill_middle":
        return await scenario_kill_middle(log_dir, gguf, after=after)
    if name == "sigkill_prefill":
        return await scenario_kill_in_prefill(log_dir, gguf)
    if name == "sigstop_last":
        stop_s = round(rng.uniform(2.0, 2.4) * HEARTBEAT_TIMEOUT_S, 2)
        return await scenario_sigstop(log_dir, gguf, after=after, stop_s=stop_s)
    if name == "wire_faults":
        return await scenario_wire_faults(log_dir, gguf, spec=WIRE_FAULTS.replace("seed=7", f"seed={seed + run}"))
    if name == "sigkill_load":
        return await scenario_kill_during_load(log_dir, gguf)
    if name == "stage_crash_loop":
        return await scenario_crash_loop(log_dir, gguf)
    if name == "client_disconnect":
        return await scenario_client_disconnect(log_dir, gguf)
    if name in ("replay_exact", "replay_fast"):
        late = random.Random(f"{seed}:replay:{run}").randint(18, 30)  # the same kill point for both modes
        return await scenario_replay(log_dir, gguf, mode=name.removeprefix("replay_"), after=late)
    raise ValueError(name)


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    p50s = [r["resume_p50_s"] for r in runs if r.get("resume_p50_s") is not None]
    p99s = [r["resume_p99_s"] for r in runs if r.get("resume_p99_s") is not None]
    gaps = [r["client_gap_s"] for r in runs if r.get("client_gap_s") is not None]
    return {
        "fault": name,
        "runs": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "faults_injected": sum(r["faults_injected"] for r in runs),
        "completed": sum(r["completed"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "tokens_lost": sum(r["tokens_lost"] for r in runs),
        "tokens_duplicated": sum(r["tokens_duplicated"] for r in runs),
        "recoveries": sum(r["recoveries"] for r in runs),
        "diverged": sum(r.get("diverged", 0) for r in runs),
        "resume_p50_s": statistics.median(p50s) if p50s else None,
        "resume_p99_s": max(p99s) if p99s else None,
        "client_gap_p50_s": round(statistics.median(gaps), 3) if gaps else None,
        "client_gap_max_s": round(max(gaps), 3) if gaps else None,
        "errors": [r["error"] for r in runs if r.get("error")],
        "log_problems": sum(len(r.get("notes", [])) for r in runs),
    }


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("fault", "fault"),
        ("runs", "runs"),
        ("requests", "reqs"),
        ("faults_injected", "faults"),
        ("completed", "done"),
        ("failed", "failed"),
        ("tokens_lost", "lost"),
        ("tokens_duplicated", "dup"),
        ("recoveries", "recov"),
        ("diverged", "diverged"),
        ("resume_p50_s", "resume p50 s"),
        ("resume_p99_s", "resume p99 s"),
        ("client_gap_p50_s", "gap p50 s"),
        ("client_gap_max_s", "gap max s"),
        ("log_problems", "log tb"),
    ]
    cells = [[h for _, h in cols]] + [[fmt(r[k]) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", nargs="*", choices=ORDER, default=ORDER)
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args()

    gguf = ensure_default_model(progress=False)
    tok = open_model(gguf).tokenizer
    started = time.perf_counter()
    per_run: dict[str, list[dict[str, Any]]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory(prefix="exo-stable-chaos-") as tmp:
        for run in range(args.runs):
            for name in args.only:
                t0 = time.perf_counter()
                log_dir = Path(tmp) / f"{name}-{run}"
                entry: dict[str, Any] = {"run": run, "requests": 1, "faults_injected": 0, "completed": 0}
                entry |= {"failed": 1, "tokens_lost": 0, "tokens_duplicated": 0, "recoveries": 0}
                try:
                    res = await run_one(name, run, args.seed, log_dir, gguf)
                except Exception as exc:  # a scenario that broke (hang, no rejoin, ...) is a failed run
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                    entry["traceback"] = traceback.format_exc()[-3000:]
                else:
                    entry["requests"] = len(res.streams)
                    entry["faults_injected"] = res.faults_injected
                    entry["fault_detail"] = res.fault_detail
                    entry["completed"] = entry["failed"] = 0
                    texts = []
                    entry["diverged"] = 0
                    for out in res.streams:
                        if res.exact:
                            lost, extra, exact = token_diff(tok, res.expected, out.text)
                        else:
                            # Fast replay: the text before the fault must be intact; what follows may differ.
                            lost, extra, exact = token_diff(tok, res.prefix, out.text[: len(res.prefix)])
                            entry["diverged"] += int(out.text != res.expected)
                        entry["tokens_lost"] += lost
                        entry["tokens_duplicated"] += extra
                        ok = out.completed and exact
                        entry["completed" if ok else "failed"] += 1
                        texts.append({"ok": ok, "error": out.error, "finishes": out.finishes, "text": out.text})
                    entry["streams"] = texts
                    owner = (res.health or {}).get("owner", {})
                    entry["recoveries"] = owner.get("recoveries", 0)
                    rec = owner.get("recovery", {})
                    entry["resume_p50_s"] = rec.get("resume_p50_s")
                    entry["resume_p99_s"] = rec.get("resume_p99_s")
                    entry["resume_by_mode"] = rec.get("resume_by_mode")
                    entry["recovery"] = rec
                    entry["client_gap_s"] = None if res.resume_gap_s is None else round(res.resume_gap_s, 3)
                    entry["notes"] = [n[:1500] for n in res.notes]
                entry["wall_s"] = round(time.perf_counter() - t0, 1)
                per_run[name].append(entry)
                status = "ok" if not entry["failed"] else f"FAILED {entry.get('error', '')[:200]}"
                print(f"[{time.perf_counter() - started:6.1f}s] {name} run {run}: {status}", flush=True)
    rows = [summarize(name, per_run[name]) for name in args.only]
    print()
    print(table(rows))
    report = {
        "host": platform.platform(),
        "python": platform.python_version(),
        "runs": args.runs,
        "seed": args.seed,
        "wire_faults": WIRE_FAULTS,
        "wall_s": round(time.perf_counter() - started, 1),
        "summary": rows,
        "per_run": per_run,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nsaved {args.out} ({report['wall_s']:.0f}s)")
    bad = any(r["failed"] or r["tokens_lost"] or r["tokens_duplicated"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
