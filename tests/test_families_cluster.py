"""Done-when check of the families work: a random-weight model directory of a family, served by
``scripts/local-cluster 3 --model DIR`` (real node processes, real sockets, the real ``openai`` client),
answers exactly as one node serving the same directory, greedy and seeded.

Two families stand for the rest here (every family's split points are proved in tests/test_families.py):
gemma3_text (embedding scale, sliding-window layers whose caches rotate within these answers, tied head) and
deepseek_v3 (multi-head latent attention, MoE layers after a dense one).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import family_models as fm
import pytest
from cluster_proc import LocalCluster, wait_gone
from openai import OpenAI

START_TIMEOUT_S = 240.0
REQUESTS = [
    {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0},
    {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 7},
]


def _answers(n: int, model: Path, log_dir: Path) -> list[tuple[str, int]]:
    cluster = LocalCluster.launch(n, "--model", str(model), "--dtype", "float32", "--log-dir", str(log_dir))
    try:
        try:
            endpoint = cluster.wait_ready(START_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{cluster.logs()}") from exc
        out = []
        # Ask the last node: its request's owner is not stage 0.
        with OpenAI(base_url=cluster.base_url(n - 1), api_key="unused", max_retries=0, timeout=120) as client:
            for body in REQUESTS:
                reply = client.completions.create(model="default", **body)  # type: ignore[call-overload]
                (choice,) = reply.choices
                assert reply.usage is not None
                out.append((choice.text, reply.usage.completion_tokens))
        assert endpoint
        return out
    finally:
        cluster.stop()
        assert not wait_gone(cluster.node_ids, 15.0), "nodes outlived the script"


@pytest.fixture(params=["gemma3_text", "deepseek_v3"])
def family_dir(request: pytest.FixtureRequest, default_gguf: Path, tmp_path: Path) -> Iterator[Path]:
    yield fm.write(request.param, tmp_path / request.param, default_gguf)


def test_three_nodes_answer_as_one(family_dir: Path, tmp_path: Path) -> None:
    one = _answers(1, family_dir, tmp_path / "one")
    three = _answers(3, family_dir, tmp_path / "three")
    assert all(tokens == 16 for _, tokens in one), one
    assert len({text for text, _ in one}) == len(one), "the greedy and seeded answers should differ"
    assert three == one
