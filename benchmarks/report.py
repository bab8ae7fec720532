"""One report from every benchmark's results: benchmarks/results/report.json and PNG charts.

Reads what the other benchmarks saved (nothing is measured here, so the report regenerates in seconds):

==================  =============================  ============================================
section             source                         chart
==================  =============================  ============================================
engine              engine.json                    charts/engine.png    decode/prefill by dtype
nodes               cluster.json                   charts/nodes.png     1 vs N nodes
concurrency         cluster.json                   charts/concurrency.png  streams at once
validation          validation.json                charts/validation.png   overhead of each level
wire                wire.json                      charts/wire.png      integrity layer on/off
recovery            chaos.json                     charts/recovery.png  time to resume per fault
==================  =============================  ============================================

A missing source is reported as missing (with the command that makes it), never invented. Usage::

    python benchmarks/report.py [--results DIR] [--out FILE] [--charts DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SOURCES: dict[str, str] = {
    "engine": "benchmarks/bench_engine.py",
    "cluster": "benchmarks/bench_cluster.py",
    "validation": "benchmarks/bench_validation.py",
    "wire": "benchmarks/bench_wire.py",
    "chaos": "benchmarks/chaos_report.py",
    "gpu": "benchmarks/bench_gpu.py (on an NVIDIA GPU)",
}
VALIDATION_GOALS = {"light": 0.02, "strict": 0.10}  # the goals: overhead in decode tokens/s against "off"
LEVELS = ("off", "light", "strict")

Json = dict[str, Any]


class Missing(Exception):
    """A source file is absent or lacks what a section needs."""


def load(results: Path, name: str) -> Json:
    path = results / f"{name}.json"
    if not path.exists():
        raise Missing(f"{path.name} is missing: run {SOURCES[name]}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise Missing(f"{path.name} does not hold a JSON object")
    return data


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


# ---- sections: pure functions from a source's JSON to the report's figures ---------------------------


def engine_section(data: Json) -> Json:
    rows = [
        {
            "dtype": r["dtype"],
            "blas": r.get("blas", ""),
            "prefill_tok_s": _num(r.get("prefill_tok_s")),
            "decode_tok_s": _num(r.get("decode_tok_s")),
            "load_s": _num(r.get("load_s")),
        }
        for r in data.get("results", [])
    ]
    if not rows:
        raise Missing("engine.json has no results")
    best = max(rows, key=lambda r: r["decode_tok_s"] or 0.0)
    return {"model": data.get("model"), "when": data.get("when"), "rows": rows, "best_decode": best}


def nodes_section(data: Json) -> Json:
    rows = [
        {
            "nodes": int(r["nodes"]),
            "ttft_s": _num(r.get("ttft_s")),
            "decode_tok_s": _num(r.get("decode_tok_s")),
            "ratio_to_single": _num(r.get("ratio_to_single")),
        }
        for r in data.get("results", [])
    ]
    if not rows:
        raise Missing("cluster.json has no results")
    return {
        "model": data.get("model"),
        "dtype": data.get("dtype"),
        "when": data.get("when"),
        "cpus": data.get("machine", {}).get("cpus"),
        "rows": sorted(rows, key=lambda r: r["nodes"]),
    }


def concurrency_section(data: Json) -> Json:
    series: dict[str, dict[str, float | None]] = {}
    for r in data.get("results", []):
        conc = r.get("concurrency") or {}
        series[str(r["nodes"])] = {str(k): _num(v) for k, v in sorted(conc.items(), key=lambda kv: int(kv[0]))}
    if not series:
        raise Missing("cluster.json has no concurrency figures")
    return {"unit": "aggregate tokens/s", "by_nodes": series}


def _level_rows(data: Json) -> list[Json]:
    """Rows ``{level, decode_tok_s, ...}`` from validation.json, whichever of the two plain layouts it uses:
    ``{"results": [{"level": ..., ...}]}`` or ``{"levels": {"off": {...}, ...}}``."""
    if isinstance(data.get("results"), list):
        return [dict(r) for r in data["results"] if isinstance(r, dict) and "level" in r]
    if isinstance(data.get("levels"), dict):
        return [{"level": k, **v} for k, v in data["levels"].items() if isinstance(v, dict)]
    return []


def validation_section(data: Json) -> Json:
    rows = _level_rows(data)
    rate_key = next(
        (k for k in ("decode_tok_s", "tok_s", "tokens_per_s") if rows and all(k in r for r in rows)),
        None,
    )
    if rate_key is None:
        raise Missing(
            "validation.json has no per-level decode rate (expected results[].level and results[].decode_tok_s); "
            f"its keys: {sorted(data)}"
        )
    by_level: dict[str, Json] = {}
    for r in rows:
        level = str(r["level"])
        by_level.setdefault(level, {"level": level, "decode_tok_s": _num(r[rate_key])})
    off = by_level.get("off", {}).get("decode_tok_s")
    out_rows = []
    for level in [*LEVELS, *sorted(set(by_level) - set(LEVELS))]:
        if level not in by_level:
            continue
        row = by_level[level]
        rate = row["decode_tok_s"]
        overhead = None if not off or rate is None else 1.0 - rate / off
        goal = VALIDATION_GOALS.get(level)
        out_rows.append(
            {
                **row,
                "overhead": None if overhead is None else round(overhead, 4),
                "goal": goal,
                "meets_goal": None if goal is None or overhead is None else overhead < goal,
            }
        )
    return {"when": data.get("when"), "rate_key": rate_key, "rows": out_rows}


def wire_section(data: Json) -> Json:
    rows = []
    for r in data.get("results", []):
        rows.append(
            {
                "message": r["message"],
                "checksum": bool(r["checksum"]),
                "messages_per_s": _num(r.get("messages_per_s")),
                "payload_MB_per_s": _num(r.get("payload_MB_per_s")),
                "rtt_p50_ms": _num(r.get("rtt_p50_ms")),
                "rtt_p99_ms": _num(r.get("rtt_p99_ms")),
            }
        )
    if not rows:
        raise Missing("wire.json has no results")
    overhead = {
        size: {k: _num(v) for k, v in figures.items()} for size, figures in data.get("integrity_overhead", {}).items()
    }
    return {"rows": rows, "integrity_overhead": overhead, "checksum_us": data.get("checksum_microbench_us", {})}


def recovery_section(data: Json) -> Json:
    rows = []
    for r in data.get("summary", []):
        rows.append(
            {
                "fault": r["fault"],
                "requests": r.get("requests"),
                "completed": r.get("completed"),
                "failed": r.get("failed"),
                "tokens_lost": r.get("tokens_lost"),
                "tokens_duplicated": r.get("tokens_duplicated"),
                "recoveries": r.get("recoveries"),
                "resume_p50_s": _num(r.get("resume_p50_s")),
                "resume_p99_s": _num(r.get("resume_p99_s")),
                "client_gap_max_s": _num(r.get("client_gap_max_s")),
            }
        )
    if not rows:
        raise Missing("chaos.json has no summary")
    return {"wire_faults": data.get("wire_faults"), "runs": data.get("runs"), "rows": rows}


# ---- charts ------------------------------------------------------------------------------------------


def gpu_section(data: Json) -> Json:
    single = data.get("single_device") or {}
    if not single:
        raise Missing("gpu.json has no single-device figures")
    rows = [
        {
            "dtype": dtype,
            "who": who,
            "prefill_tok_s": _num(row[who].get("prefill_tok_s")),
            "decode_tok_s": _num(row[who].get("decode_tok_s")),
        }
        for dtype, row in single.items()
        for who in ("mlx_lm", "exo_stable", "exo_stable_sync")
        if isinstance(row.get(who), dict)
    ]
    nodes = [
        {
            "layout": r.get("layout", f"{r['nodes']} node(s)"),
            "nodes": int(r["nodes"]),
            "split": r.get("split"),
            "decode_tok_s": _num(r.get("decode_tok_s")),
            "aggregate_tok_s": {str(k): _num(v) for k, v in (r.get("aggregate_tok_s") or {}).items()},
        }
        for r in data.get("nodes", [])
    ]
    return {
        "device": data.get("device"),
        "model": data.get("model"),
        "rows": rows,
        "ratio_to_mlx_lm": {d: _num(r.get("decode_ratio_to_mlx_lm")) for d, r in single.items()},
        "nodes": nodes,
        "split_ratio": _num(data.get("split_ratio")),
        "split_identical": data.get("split_identical"),
    }


def chart_gpu(section: Json) -> Figure:
    fig, (left, right) = _figure(f"{section.get('model')} on {section.get('device')}", 2)
    labels = [f"{r['dtype']}\n{r['who']}" for r in section["rows"]]
    _bars(left, labels, [r["decode_tok_s"] for r in section["rows"]], "decode tokens/s (one device)")
    for row in section["nodes"]:
        series = row["aggregate_tok_s"]
        if not series:
            continue  # a layout measured with single streams only
        label = f"{row.get('layout', '')} {row['split']}".strip()
        right.plot([int(k) for k in series], [v or 0.0 for v in series.values()], marker="o", label=label)
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent streams")
    right.set_ylabel("aggregate tokens/s (node processes)")
    right.legend()
    return fig


def _figure(title: str, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), squeeze=False)
    fig.suptitle(title)
    return fig, list(axes[0])


def _bars(ax: Axes, labels: Sequence[str], values: Sequence[float | None], ylabel: str) -> None:
    heights = [v or 0.0 for v in values]
    bars = ax.bar(range(len(labels)), heights, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    for bar, v in zip(bars, values, strict=True):
        text = "n/a" if v is None else f"{v:.3g}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")


def chart_engine(section: Json) -> Figure:
    fig, (left, right) = _figure(f"Single device: {section.get('model')}", 2)
    labels = [f"{r['dtype']}\n{r['blas']}" for r in section["rows"]]
    _bars(left, labels, [r["decode_tok_s"] for r in section["rows"]], "decode tokens/s")
    _bars(right, labels, [r["prefill_tok_s"] for r in section["rows"]], "prefill tokens/s")
    return fig


def chart_nodes(section: Json) -> Figure:
    fig, (left, right) = _figure(f"1 vs N nodes ({section.get('dtype')}, {section.get('cpus')} CPUs shared)", 2)
    labels = [f"{r['nodes']} node{'s' if r['nodes'] > 1 else ''}" for r in section["rows"]]
    _bars(left, labels, [r["decode_tok_s"] for r in section["rows"]], "decode tokens/s (one stream)")
    _bars(right, labels, [r["ttft_s"] for r in section["rows"]], "time to first token (s)")
    return fig


def chart_concurrency(section: Json) -> Figure:
    fig, (ax,) = _figure("Aggregate throughput with several streams at once")
    for nodes, series in section["by_nodes"].items():
        xs = [int(k) for k in series]
        ax.plot(xs, [v or 0.0 for v in series.values()], marker="o", label=f"{nodes} node(s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel(section["unit"])
    ax.legend()
    return fig


def chart_validation(section: Json) -> Figure:
    fig, (left, right) = _figure("Validation levels", 2)
    rows = section["rows"]
    _bars(left, [r["level"] for r in rows], [r["decode_tok_s"] for r in rows], "decode tokens/s")
    levels = [r for r in rows if r["level"] != "off"]
    _bars(
        right,
        [r["level"] for r in levels],
        [None if r["overhead"] is None else 100 * r["overhead"] for r in levels],
        "overhead against off (%)",
    )
    for i, r in enumerate(levels):
        if r["goal"] is not None:
            right.hlines(100 * r["goal"], i - 0.4, i + 0.4, colors="tab:red", linestyles="dashed")
    return fig


def chart_wire(section: Json) -> Figure:
    fig, (left, right) = _figure("Wire: integrity layer (checksums) on and off", 2)
    sizes = list(dict.fromkeys(r["message"] for r in section["rows"]))
    width = 0.38
    for offset, checksum, label in ((-width / 2, True, "checksum on"), (width / 2, False, "checksum off")):
        by = {r["message"]: r for r in section["rows"] if r["checksum"] is checksum}
        xs = [i + offset for i in range(len(sizes))]
        left.bar(xs, [by.get(s, {}).get("messages_per_s") or 0.0 for s in sizes], width, label=label)
        right.bar(xs, [by.get(s, {}).get("rtt_p50_ms") or 0.0 for s in sizes], width, label=label)
    for ax, ylabel in ((left, "messages/s"), (right, "round trip p50 (ms)")):
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("message size")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.legend()
    return fig


def chart_recovery(section: Json) -> Figure:
    fig, (ax,) = _figure("Recovery: time from the failure to the next token, per fault")
    rows = section["rows"]
    labels = [r["fault"] for r in rows]
    xs = list(range(len(rows)))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [r["resume_p50_s"] or 0.0 for r in rows], width, label="resume p50 (owner)")
    ax.bar([x + width / 2 for x in xs], [r["client_gap_max_s"] or 0.0 for r in rows], width, label="client gap max")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(
            f"{r['completed']}/{r['requests']} ok, lost {r['tokens_lost']}", (x, 0), ha="center", va="bottom", size=8
        )
    ax.set_xticks(xs, labels, rotation=20, ha="right")
    ax.set_ylabel("seconds")
    ax.legend()
    return fig


# ---- the report --------------------------------------------------------------------------------------

Section = Callable[[Json], Json]
Chart = Callable[[Json], Figure]
PLAN: tuple[tuple[str, str, Section, Chart], ...] = (
    ("engine", "engine", engine_section, chart_engine),
    ("nodes", "cluster", nodes_section, chart_nodes),
    ("concurrency", "cluster", concurrency_section, chart_concurrency),
    ("validation", "validation", validation_section, chart_validation),
    ("wire", "wire", wire_section, chart_wire),
    ("recovery", "chaos", recovery_section, chart_recovery),
    ("gpu", "gpu", gpu_section, chart_gpu),
)


def build_report(results: Path, charts: Path, *, base: Path | None = None) -> Json:
    """Every section that its source allows, its chart written under ``charts``; the rest named as missing."""
    charts.mkdir(parents=True, exist_ok=True)
    sources: dict[str, Json] = {}
    report: Json = {"generated": datetime.now(UTC).isoformat(timespec="seconds"), "sections": {}, "missing": {}}
    for name, source, section_fn, chart_fn in PLAN:
        try:
            if source not in sources:
                sources[source] = load(results, source)
            section = section_fn(sources[source])
        except Missing as exc:
            report["missing"][name] = str(exc)
            continue
        path = charts / f"{name}.png"
        fig = chart_fn(section)
        try:
            fig.tight_layout()
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        section["chart"] = str(path.relative_to(base)) if base and path.is_relative_to(base) else str(path)
        report["sections"][name] = section
    report["sources"] = {name: (results / f"{name}.json").exists() for name in SOURCES}
    return report


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    out = []
    sections = report["sections"]
    if "nodes" in sections:
        for r in sections["nodes"]["rows"]:
            out.append(
                f"nodes={r['nodes']}: decode {r['decode_tok_s']} tok/s, ttft {r['ttft_s']} s, "
                f"x{r['ratio_to_single']} of one node"
            )
    if "validation" in sections:
        for r in sections["validation"]["rows"]:
            over = "" if r["overhead"] is None else f", overhead {100 * r['overhead']:.1f}%"
            goal = (
                ""
                if r["goal"] is None
                else f" (goal < {100 * r['goal']:.0f}%: {'met' if r['meets_goal'] else 'MISSED'})"
            )
            out.append(f"validation {r['level']}: {r['decode_tok_s']} tok/s{over}{goal}")
    if "recovery" in sections:
        for r in sections["recovery"]["rows"]:
            out.append(
                f"recovery {r['fault']}: {r['completed']}/{r['requests']} completed, resume p50 {r['resume_p50_s']} s,"
                f" lost {r['tokens_lost']}, duplicated {r['tokens_duplicated']}"
            )
    if "wire" in sections:
        for size, figures in sections["wire"]["integrity_overhead"].items():
            out.append(f"wire {size}: throughput off/on x{figures.get('throughput_ratio_off_over_on')}")
    if "gpu" in sections:
        gpu = sections["gpu"]
        out.append(
            f"gpu ({gpu['device']}, {gpu['model']}): exo-stable / mlx-lm decode {gpu['ratio_to_mlx_lm']}; "
            f"split / single {gpu['split_ratio']}, identical {gpu['split_identical']}"
        )
    for name, why in report["missing"].items():
        out.append(f"{name}: MISSING ({why})")
    for name, section in sections.items():
        out.append(f"chart {name}: {section['chart']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the benchmarks saved their JSON")
    parser.add_argument("--out", type=Path, help="the report's JSON (default: RESULTS/report.json)")
    parser.add_argument("--charts", type=Path, help="where the PNG charts go (default: RESULTS/charts)")
    args = parser.parse_args(argv)
    out: Path = args.out or args.results / "report.json"
    charts: Path = args.charts or args.results / "charts"
    report = build_report(args.results, charts, base=ROOT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for line in summary_lines(report):
        print(line)
    print(f"report: {out}")
    return 0 if report["sections"] else 1


if __name__ == "__main__":
    sys.exit(main())
