"""exo-stable verify: the comparison logic, the validator on real in-process clusters, and the command.

The validator must both pass a correct cluster (every split point of a tiny random llama, greedy and
seeded, a deterministic rerun, a short stress test) and fail a wrong one at the right position.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from exo_stable import cli
from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.tokenizer import ChatMessage
from exo_stable.verify.run import (
    GREEDY,
    ComparisonResult,
    DistributedInferenceValidator,
    Generation,
    InProcessCluster,
    Prompt,
    RemoteCluster,
    SingleDevice,
    all_splits,
    compare_sequences,
    display_width,
    even_split,
    first_divergence,
    format_table,
    in_process_cluster,
    load_prompts,
    parse_duration,
    percentile,
    seeded,
    text_divergence_token,
)

REPO = Path(__file__).resolve().parents[1]
N_LAYERS = 6
PROMPTS = (
    Prompt.of("What is the capital of France?"),
    Prompt.of([ChatMessage("system", "Sé breve."), ChatMessage("user", "¿Qué es un arcoíris?")]),
)


# --- pure logic --------------------------------------------------------------------------------------


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([], []) is None
    assert first_divergence([1, 2, 3], [9, 2, 3]) == 0
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # the cluster stopped early
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # the cluster ran on
    assert first_divergence([], [5]) == 0
    assert first_divergence("hello", "help!") == 3


def test_compare_sequences() -> None:
    same = compare_sequences([4, 5, 6], (4, 5, 6))
    assert same.identical and same.first_divergence is None and same.compared == 3
    shorter = compare_sequences([4, 5, 6, 7], [4, 5])
    assert not shorter.identical and shorter.first_divergence == 2 and shorter.compared == 4
    assert (shorter.expected_len, shorter.actual_len) == (4, 2)
    changed = compare_sequences([4, 5, 6], [4, 0, 6])
    assert not changed.identical and changed.first_divergence == 1 and changed.compared == 3


class _CharTokenizer:
    """Token i is the character chr(i)."""

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def test_text_divergence_maps_to_the_reference_token() -> None:
    tok = _CharTokenizer()
    ids = [ord(c) for c in "abcdef"]
    assert text_divergence_token(tok, ids, "abcdef") is None  # type: ignore[arg-type]
    assert text_divergence_token(tok, ids, "abcXef") == 3  # type: ignore[arg-type]
    assert text_divergence_token(tok, ids, "ab") == 2  # type: ignore[arg-type]


def test_durations_splits_percentiles() -> None:
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("2m") == timedelta(minutes=2)
    assert parse_duration("500ms") == timedelta(milliseconds=500)
    assert parse_duration("1.5") == timedelta(seconds=1.5)
    for bad in ("", "soon", "-1s", "0s", "3d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert even_split(30, 3) == (10, 10, 10)
    assert even_split(7, 3) == (3, 2, 2)
    assert all_splits(4, 2) == [(1, 3), (2, 2), (3, 1)]
    assert len(all_splits(6, 3)) == 10 and all(sum(s) == 6 and min(s) >= 1 for s in all_splits(6, 3))
    with pytest.raises(ValueError):
        all_splits(2, 3)
    assert percentile([], 50) == 0.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile([3.0], 99) == 3.0


def test_load_prompts(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["hi", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]]))
    prompts = load_prompts(path)
    assert prompts[0] == Prompt((ChatMessage("user", "hi"),))
    assert prompts[1].messages == (ChatMessage("system", "s"), ChatMessage("user", "u"))
    for bad in ("[]", "{}", "[1]", '[[{"role": "user"}]]', "not json"):
        path.write_text(bad)
        with pytest.raises(ValueError):
            load_prompts(path)


def test_table_marks_divergences_and_aligns_wide_text() -> None:
    def row(prompt: str, at: int | None) -> ComparisonResult:
        return ComparisonResult(
            prompt=prompt, mode="greedy", split="3+3", unit="ids", tokens_compared=8, identical=at is None,
            first_divergence=at, single_tokens=(), cluster_tokens=(), single_text="", cluster_text="",
            single_seconds=1.0, cluster_seconds=1.0, single_tokens_per_s=8.0, cluster_tokens_per_s=8.0,
        )  # fmt: skip

    table = format_table([row("用一句话介绍一下你自己。用一句话介绍一下你自己。", None), row("short", 5)])
    lines = table.splitlines()
    assert "identical" in lines[2] and "-" in lines[2]
    assert "DIFFERS" in lines[3] and " 5 " in lines[3]
    columns = {display_width(line[: line.index("greedy")]) for line in lines[2:]}
    assert len(columns) == 1, table  # the mode column starts at the same terminal column on every row


# --- the validator on in-process clusters ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("verify") / "tiny.gguf", default_gguf, layers=N_LAYERS, seed=3)


@pytest.fixture(scope="module")
def other_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("verify") / "other.gguf", default_gguf, layers=N_LAYERS, seed=4)


async def test_every_split_point_deterministic_and_stress(tiny_model: Path) -> None:
    splits = all_splits(N_LAYERS, 2)
    async with (
        SingleDevice(open_model(tiny_model), Dtype.FLOAT32) as reference,
        in_process_cluster(tiny_model, Dtype.FLOAT32, splits[0], request_timeout_s=60) as cluster,
    ):
        validator = DistributedInferenceValidator(reference, cluster, max_tokens=8, seed=11, prompts=PROMPTS)
        results = []
        for split in splits:
            if cluster.split != split:
                await cluster.resplit(split)
            results += await validator.compare_all()
        assert len(results) == len(splits) * len(PROMPTS) * 2
        assert {r.split for r in results} == {"1+5", "2+4", "3+3", "4+2", "5+1"}
        for r in results:
            assert r.identical, r
            assert r.first_divergence is None and r.tokens_compared == 8 and r.unit == "ids"
            assert r.cluster_tokens == r.single_tokens and r.cluster_text == r.single_text
        assert any(len(set(r.single_tokens)) > 2 for r in results), "the reference should not be degenerate"
        greedy = {r.single_tokens for r in results if r.mode == "greedy"}
        sampled = {r.single_tokens for r in results if r.mode == "seeded"}
        assert greedy != sampled

        det = await validator.run_deterministic_test(seed=123, prompt="Tell me a story.")
        assert det.all_equal and det.cluster_consistent and det.matches_single and len(det.cluster_runs) == 2
        assert det.first_divergence is None and det.cluster_runs[0].token_ids == det.single.token_ids

        stress = await validator.stress_test_pipeline(timedelta(seconds=2.5), concurrency=3)
        assert stress.ok, stress
        assert stress.requests >= 3 and stress.mismatches == 0 and stress.errors == 0
        assert stress.tokens == stress.requests * 8 and stress.p99_latency_s >= stress.p50_latency_s > 0

        # The same cluster through its nodes' OpenAI API: text is compared.
        urls = [f"http://127.0.0.1:{node.port}" for node in cluster.nodes]
        async with RemoteCluster(urls, request_timeout_s=60) as remote:
            assert remote.describe() == "5+1"
            over_http = DistributedInferenceValidator(reference, remote, max_tokens=8, seed=11, prompts=PROMPTS)
            for params in (GREEDY, seeded(11)):
                r = await over_http.compare_single_vs_distributed(PROMPTS[1], params)
                assert r.identical and r.unit == "text" and r.cluster_tokens is None, r


class _Corrupting:
    """A cluster whose answers are altered from ``position`` on (a stand-in for a broken pipeline)."""

    def __init__(self, inner: InProcessCluster, position: int, *, truncate: bool = False) -> None:
        self.inner = inner
        self.position = position
        self.truncate = truncate
        self.unit = inner.unit

    def describe(self) -> str:
        return self.inner.describe()

    async def generate(
        self, prompt: Prompt, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int
    ) -> Generation:
        got = await self.inner.generate(prompt, prompt_ids, params, max_tokens)
        assert got.token_ids is not None
        ids = list(got.token_ids)
        if self.truncate:
            ids = ids[: self.position]
        else:
            ids[self.position] = (ids[self.position] + 1) % 49152
        return replace(got, token_ids=tuple(ids), tokens=len(ids))


async def test_the_validator_fails_a_wrong_cluster(tiny_model: Path, other_model: Path) -> None:
    async with (
        SingleDevice(open_model(tiny_model), Dtype.FLOAT32) as reference,
        SingleDevice(open_model(other_model), Dtype.FLOAT32) as wrong_reference,
        in_process_cluster(tiny_model, Dtype.FLOAT32, (3, 3), request_timeout_s=60) as cluster,
    ):
        # A cluster running other weights than the reference's.
        mismatched = DistributedInferenceValidator(wrong_reference, cluster, max_tokens=8, prompts=PROMPTS)
        r = await mismatched.compare_single_vs_distributed(PROMPTS[0])
        assert not r.identical
        assert r.cluster_tokens is not None
        assert r.first_divergence == first_divergence(r.single_tokens, r.cluster_tokens) is not None
        det = await mismatched.run_deterministic_test(seed=5, prompt=PROMPTS[0])
        assert det.cluster_consistent and not det.matches_single and not det.all_equal

        # A pipeline that corrupts token 3, or stops after 5 tokens.
        broken = DistributedInferenceValidator(reference, _Corrupting(cluster, 3), max_tokens=8, prompts=PROMPTS)
        for params in (GREEDY, seeded(9)):
            r = await broken.compare_single_vs_distributed(PROMPTS[1], params)
            assert not r.identical and r.first_divergence == 3 and r.tokens_compared == 8, r
        short = DistributedInferenceValidator(
            reference, _Corrupting(cluster, 5, truncate=True), max_tokens=8, prompts=PROMPTS
        )
        r = await short.compare_single_vs_distributed(PROMPTS[0])
        assert not r.identical and r.first_divergence == 5 and r.tokens_compared == 8
        table = format_table([r])
        assert "DIFFERS" in table

        stress = await broken.stress_test_pipeline(1.0, concurrency=2)
        assert not stress.ok and stress.mismatches == stress.requests > 0
        assert all(m.first_divergence == 3 for m in stress.examples)


# --- the command -------------------------------------------------------------------------------------


def test_cli_usage_errors(tmp_path: Path) -> None:
    parser = cli.build_parser()
    assert cli._verify(parser.parse_args(["verify", "--stages", "0"])) == 2
    assert cli._verify(parser.parse_args(["verify", "--stress", "soon"])) == 2
    assert cli._verify(parser.parse_args(["verify", "--nodes", "http://x:1", "--all-splits"])) == 2
    assert cli._verify(parser.parse_args(["verify", "--prompts", str(tmp_path / "missing.json")])) == 2


def test_cli_end_to_end(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Bonjour !", [{"role": "user", "content": "Count to five."}]]))
    env = dict(os.environ, EXO_STABLE_BLAS_CHECKED="1")
    args = f"verify --tiny 4 --stages 2 --max-tokens 6 --dtype float32 --prompts {prompts}"
    proc = subprocess.run(
        [sys.executable, "-m", "exo_stable", *args.split()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = "prompt mode split compared diverges at tok/s single tok/s cluster result"
    assert lines[0].split() == header.split()
    rows = [line for line in lines if line.endswith("identical")]
    assert len(rows) == 4 and all(" 2+2 " in row and "6 ids" in row for row in rows)
    assert "4/4 runs identical to the single device" in proc.stdout
    assert "-> equal" in proc.stdout
    assert "serving" not in proc.stdout  # the nodes' status lines go to stderr
