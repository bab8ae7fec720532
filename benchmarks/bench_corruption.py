"""Does the seed's CorruptionDetector earn a place at the strict level? Its cost per delta and its findings.

    python benchmarks/bench_corruption.py [--repeat 20]

The seed design runs ``CorruptionDetector.analyze_output`` on the assembled text. This script measures, on the
llama.cpp oracle's greedy SmolLM2 answers (/work/shared/oracle, or ``--oracle``), split into deltas of the
sizes the detokenizer emits (one token, about 4 characters):

- the cost per delta of analysing the text assembled so far (what the design asks), against the per-delta
  checks strict already runs (``DeltaChecker`` at ``strict``), for answers of 128 to 8192 characters;
- what it finds in these answers, which are llama.cpp's own correct output (every finding is a false
  positive as far as corruption between devices goes), and what it finds that strict's checks do not, in
  text corrupted the ways a transport or a detokenizer could corrupt it.

Prints the figures and saves benchmarks/results/corruption.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from exo_stable.pipeline.corruption import CorruptionDetector  # noqa: E402
from exo_stable.pipeline.levels import DeltaChecker, OutputWatch, ValidationLevel  # noqa: E402

ORACLE = Path(os.environ.get("EXO_STABLE_ORACLE", ROOT.parent / "shared" / "oracle")) / "smollm2-llamacpp.json"


def deltas(text: str, size: int = 4) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def per_delta_us(texts: list[str], repeat: int) -> tuple[float, float, float]:
    """Mean microseconds per delta: the detector on the whole text assembled so far, strict's DeltaChecker,
    and the detector as the owner runs it at strict (OutputWatch: the last 512 characters)."""
    det = CorruptionDetector()
    n = 0
    t_det = t_chk = t_watch = 0.0
    for _ in range(repeat):
        for text in texts:
            chk = DeltaChecker(ValidationLevel.STRICT)
            watch = OutputWatch(ValidationLevel.STRICT)
            assembled = ""
            for d in deltas(text):
                assembled += d
                t0 = time.perf_counter()
                det.analyze_output(assembled)
                t1 = time.perf_counter()
                chk.check(d)
                t2 = time.perf_counter()
                watch.feed(d)
                t3 = time.perf_counter()
                t_det += t1 - t0
                t_chk += t2 - t1
                t_watch += t3 - t2
                n += 1
    return t_det / n * 1e6, t_chk / n * 1e6, t_watch / n * 1e6


def corrupted(text: str) -> dict[str, str]:
    """The text damaged as a broken transport or detokenizer would damage it."""
    mid = len(text) // 2
    return {
        "replacement_char": text[:mid] + "\ufffd" + text[mid:],
        "control_char": text[:mid] + "\x07" + text[mid:],
        "lone_surrogate": text[:mid] + "\ud800" + text[mid:],
        "mojibake": text.encode("utf-8").decode("latin-1"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--oracle", type=Path, default=ORACLE)
    args = ap.parse_args()
    cases = json.loads(args.oracle.read_text())["cases"]
    answers = [c["greedy_text"] for c in cases if c.get("greedy_text")]
    det = CorruptionDetector()

    clean_findings: Counter[str] = Counter()
    flagged = []
    for text in answers:
        kinds = sorted(k.value for k in det.analyze_output(text).kinds)
        clean_findings.update(kinds)
        if kinds:
            flagged.append({"text": text[:60], "kinds": kinds})

    missed_by_strict: Counter[str] = Counter()
    caught_by_detector: Counter[str] = Counter()
    for text in answers:
        for kind, bad in corrupted(text).items():
            if bad == text:
                continue  # ASCII answers are unchanged by mojibake
            chk = DeltaChecker(ValidationLevel.STRICT)
            strict_saw = any(chk.check(d) is not None for d in deltas(bad))
            detector_saw = bool(det.analyze_output(bad).findings)
            if detector_saw:
                caught_by_detector[kind] += 1
            if detector_saw and not strict_saw:
                missed_by_strict[kind] += 1

    joined = " ".join(answers)
    costs = {}
    for chars in (128, 512, 2048, 8192):
        text = (joined * (chars // len(joined) + 1))[:chars]
        repeat = max(1, args.repeat * 512 // chars)
        det_us, chk_us, watch_us = per_delta_us([text], repeat)
        costs[str(chars)] = {
            "detector_us_per_delta": round(det_us, 1),
            "strict_checks_us_per_delta": round(chk_us, 2),
            "served_window_us_per_delta": round(watch_us, 1),
        }

    out = {
        "benchmark": "CorruptionDetector at the strict level",
        "machine": platform.platform(),
        "answers": len(answers),
        "answers_flagged_clean": len(flagged),
        "findings_on_clean_answers": dict(clean_findings),
        "flagged": flagged,
        "corruptions_caught_by_detector": dict(caught_by_detector),
        "corruptions_caught_only_by_detector": dict(missed_by_strict),
        "cost_by_answer_chars": costs,
    }
    print(f"{len(answers)} llama.cpp answers; the detector flags {len(flagged)} of them: {dict(clean_findings)}")
    for f in flagged:
        print(f"  {f['kinds']}: {f['text']!r}")
    print(f"injected corruption caught by the detector: {dict(caught_by_detector)}")
    print(f"  of which strict's per-delta checks miss: {dict(missed_by_strict)}")
    for chars, c in costs.items():
        print(
            f"answer of {chars:>5} chars: detector {c['detector_us_per_delta']:>8.1f} us/delta,"
            f" strict checks {c['strict_checks_us_per_delta']:>6.2f} us/delta,"
            f" as served (512-char window) {c['served_window_us_per_delta']:>7.1f} us/delta"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "corruption.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
