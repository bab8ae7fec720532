"""benchmarks/report.py on the committed benchmark results, in a temporary directory: JSON and PNG charts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "report.py"
COMMITTED = REPO / "benchmarks" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A copy of the committed results (validation.json left out: the tests choose what it holds)."""
    out = tmp_path / "results"
    out.mkdir()
    for name in ("engine", "cluster", "wire", "chaos"):
        shutil.copy(COMMITTED / f"{name}.json", out / f"{name}.json")
    return out


def run_report(results: Path) -> tuple[dict[str, Any], str]:
    args = [sys.executable, str(SCRIPT), "--results", str(results)]
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads((results / "report.json").read_text(encoding="utf-8"))
    return report, done.stdout


def test_report_from_the_committed_results(results: Path) -> None:
    report, stdout = run_report(results)
    sections = report["sections"]
    assert set(sections) == {"engine", "nodes", "concurrency", "wire", "recovery"}
    assert "validation" in report["missing"] and "validation.json is missing" in report["missing"]["validation"]
    cluster = json.loads((results / "cluster.json").read_text(encoding="utf-8"))
    assert [r["nodes"] for r in sections["nodes"]["rows"]] == [r["nodes"] for r in cluster["results"]]
    assert sections["nodes"]["rows"][0]["decode_tok_s"] == cluster["results"][0]["decode_tok_s"]
    chaos = json.loads((results / "chaos.json").read_text(encoding="utf-8"))
    assert [r["fault"] for r in sections["recovery"]["rows"]] == [r["fault"] for r in chaos["summary"]]
    for name, section in sections.items():
        chart = Path(section["chart"])
        assert chart == results / "charts" / f"{name}.png"
        assert chart.read_bytes()[:8] == PNG_MAGIC, name
        assert chart.stat().st_size > 5000, f"{name}: a chart with something drawn in it"
    assert "validation: MISSING" in stdout


def test_validation_levels_are_charted_against_off(results: Path) -> None:
    levels = [
        {"level": "off", "decode_tok_s": 20.0},
        {"level": "light", "decode_tok_s": 19.8},
        {"level": "strict", "decode_tok_s": 17.0},
    ]
    (results / "validation.json").write_text(json.dumps({"results": levels}), encoding="utf-8")
    report, stdout = run_report(results)
    rows = {r["level"]: r for r in report["sections"]["validation"]["rows"]}
    assert rows["off"]["overhead"] == 0.0
    assert rows["light"]["overhead"] == pytest.approx(0.01) and rows["light"]["meets_goal"] is True
    assert rows["strict"]["overhead"] == pytest.approx(0.15) and rows["strict"]["meets_goal"] is False
    assert (results / "charts" / "validation.png").read_bytes()[:8] == PNG_MAGIC
    assert "validation strict: 17.0 tok/s, overhead 15.0% (goal < 10%: MISSED)" in stdout


def test_an_unrecognised_validation_file_is_reported_not_guessed(results: Path) -> None:
    (results / "validation.json").write_text(json.dumps({"figures": [1, 2, 3]}), encoding="utf-8")
    report, _ = run_report(results)
    assert "validation" not in report["sections"]
    assert "its keys: ['figures']" in report["missing"]["validation"]
