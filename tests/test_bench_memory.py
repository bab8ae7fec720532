"""The memory benchmark's code on a ~300 MB model: three nodes with budgets too small for the whole model
each stay within 1.15 x their share + 300 MB, one node alone refuses the model with the numbers, and the
split answer equals the whole model's (benchmarks/bench_memory.py runs the same at 4 GB)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_memory import run, table


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_split_nodes_hold_only_their_share(tmp_path: Path, fmt: str) -> None:
    result = run(0.3, tmp_path, timeout=300, formats=(fmt,))
    data = result["formats"][fmt]
    assert "cannot place" in data["single_node_refusal"] and "needs" in data["single_node_refusal"]
    assert data["split_equals_whole"], table(result)
    assert len(data["nodes"]) == 3
    assert all(node["ok"] for node in data["nodes"]), table(result)
