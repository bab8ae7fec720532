"""The pure half of ``exo-stable verify``: comparing sequences, the prompts and sampling modes, results, reports.

:func:`first_divergence` and :func:`compare_sequences` say where a cluster's answer leaves the single
device's; the result types (:class:`ComparisonResult`, :class:`DeterministicResult`,
:class:`StressTestResult`) and the ``format_*`` functions turn runs into the tables the command prints.
Nothing here starts a model, a node or a socket: the targets are in :mod:`exo_stable.verify.targets`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from exo_stable.engine.sampling import SamplingParams
from exo_stable.tokenizer import ChatMessage, Tokenizer

T = TypeVar("T")
Unit = Literal["ids", "text"]

# --- pure comparison ---------------------------------------------------------------------------------


def first_divergence(expected: Sequence[T], actual: Sequence[T]) -> int | None:
    """Index of the first position where the sequences differ (a missing element differs); None if equal."""
    for i, (a, b) in enumerate(zip(expected, actual, strict=False)):
        if a != b:
            return i
    if len(expected) != len(actual):
        return min(len(expected), len(actual))
    return None


@dataclass(frozen=True, slots=True)
class SequenceComparison:
    compared: int  # positions compared: the longer of the two lengths
    identical: bool
    first_divergence: int | None
    expected_len: int
    actual_len: int


def compare_sequences(expected: Sequence[T], actual: Sequence[T]) -> SequenceComparison:
    at = first_divergence(expected, actual)
    return SequenceComparison(
        compared=max(len(expected), len(actual)),
        identical=at is None,
        first_divergence=at,
        expected_len=len(expected),
        actual_len=len(actual),
    )


def text_divergence_token(tokenizer: Tokenizer, expected_ids: Sequence[int], actual_text: str) -> int | None:
    """The first of ``expected_ids`` whose text ``actual_text`` does not continue (None: it continues all)."""
    for k in range(len(expected_ids)):
        prefix = tokenizer.decode(expected_ids[: k + 1], skip_special=True).rstrip("\ufffd")
        if not actual_text.startswith(prefix):
            return k
    return None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> timedelta:
    """``30s``, ``2m``, ``1.5h``, ``500ms`` or plain seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 2m, 500ms)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    seconds = value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if seconds <= 0:
        raise ValueError(f"the duration must be positive: {text!r}")
    return timedelta(seconds=seconds)


def even_split(layers: int, stages: int) -> tuple[int, ...]:
    """Layers per stage as even as possible (earlier stages take the remainder)."""
    if not 1 <= stages <= layers:
        raise ValueError(f"cannot split {layers} layers into {stages} stages")
    base, extra = divmod(layers, stages)
    return tuple(base + (1 if i < extra else 0) for i in range(stages))


def all_splits(layers: int, stages: int) -> list[tuple[int, ...]]:
    """Every way to cut ``layers`` into ``stages`` non-empty consecutive ranges."""
    if not 1 <= stages <= layers:
        raise ValueError(f"cannot split {layers} layers into {stages} stages")
    out = []
    for cuts in itertools.combinations(range(1, layers), stages - 1):
        bounds = (0, *cuts, layers)
        out.append(tuple(b - a for a, b in itertools.pairwise(bounds)))
    return out


def split_label(split: Sequence[int]) -> str:
    return "+".join(str(n) for n in split)


# --- prompts and sampling modes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: tuple[ChatMessage, ...]

    @classmethod
    def of(cls, value: str | Sequence[ChatMessage] | Prompt) -> Prompt:
        if isinstance(value, Prompt):
            return value
        if isinstance(value, str):
            return cls((ChatMessage("user", value),))
        return cls(tuple(value))

    @property
    def label(self) -> str:
        return self.messages[-1].content if self.messages else ""

    def short(self, width: int = 28) -> str:
        """The last message on one line, cut to ``width`` terminal columns."""
        text = " ".join(self.label.split())
        if display_width(text) <= width:
            return text
        while display_width(text) > width - 1:
            text = text[:-1]
        return text + "…"


def display_width(text: str) -> int:
    """Terminal columns of ``text`` (East Asian wide and full-width characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _pad(text: str, width: int, *, right: bool = False) -> str:
    fill = " " * max(0, width - display_width(text))
    return fill + text if right else text + fill


DEFAULT_PROMPTS: tuple[Prompt, ...] = (
    Prompt.of("What is the capital of France? Answer in one sentence."),
    Prompt.of("Écris un court poème sur la mer."),
    Prompt.of("Erkläre in zwei Sätzen, wie ein Regenbogen entsteht."),
    Prompt.of("¿Cuántos días tiene un año bisiesto?"),
    Prompt.of("用一句话介绍一下你自己。"),
    Prompt.of(
        [
            ChatMessage("system", "You are a terse Python expert."),
            ChatMessage("user", "Write a function that reverses a string."),
        ]
    ),
)


def load_prompts(path: Path) -> list[Prompt]:
    """A JSON list of strings, or of message lists (``[{"role": ..., "content": ...}, ...]``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of prompts")
    prompts = []
    for i, item in enumerate(data):
        if isinstance(item, str) and item:
            prompts.append(Prompt.of(item))
        elif isinstance(item, list) and item and all(_is_message(m) for m in item):
            prompts.append(Prompt(tuple(ChatMessage(str(m["role"]), str(m["content"])) for m in item)))
        else:
            raise ValueError(f"{path}: prompt {i} is neither a string nor a list of {{role, content}} messages")
    return prompts


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


GREEDY = SamplingParams()


def seeded(seed: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=seed)


def mode_name(params: SamplingParams) -> str:
    return "greedy" if params.greedy else "seeded"


# --- generations -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generation:
    """One completion: its token ids (None where the target cannot tell them), text and timing."""

    token_ids: tuple[int, ...] | None
    text: str
    tokens: int
    seconds: float
    finish_reason: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ComparisonResult:
    prompt: str
    mode: str
    split: str
    unit: Unit
    tokens_compared: int
    identical: bool
    first_divergence: int | None  # a token position (in text mode: of the reference's tokens)
    single_tokens: tuple[int, ...]
    cluster_tokens: tuple[int, ...] | None  # None in text mode
    single_text: str
    cluster_text: str
    single_seconds: float
    cluster_seconds: float
    single_tokens_per_s: float
    cluster_tokens_per_s: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DeterministicResult:
    prompt: str
    seed: int
    split: str
    single: Generation
    cluster_runs: tuple[Generation, ...]
    cluster_consistent: bool  # every cluster run equal to the first
    matches_single: bool  # the first cluster run equal to the single device
    first_divergence: int | None

    @property
    def all_equal(self) -> bool:
        return self.cluster_consistent and self.matches_single


@dataclass(frozen=True, slots=True)
class Mismatch:
    prompt: str
    mode: str
    first_divergence: int | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StressTestResult:
    split: str
    duration_s: float
    concurrency: int
    requests: int
    tokens: int
    mismatches: int
    errors: int
    tokens_per_s: float
    p50_latency_s: float
    p99_latency_s: float
    examples: tuple[Mismatch, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.mismatches == 0 and self.errors == 0


# --- reports -----------------------------------------------------------------------------------------

_COLUMNS = ("prompt", "mode", "split", "compared", "diverges at", "tok/s single", "tok/s cluster", "result")


def format_table(results: Sequence[ComparisonResult]) -> str:
    rows = []
    for r in results:
        unit = "ids" if r.unit == "ids" else "text"
        verdict = "identical" if r.identical else ("ERROR" if r.error else "DIFFERS")
        rows.append(
            (
                Prompt.of(r.prompt).short(),
                r.mode,
                r.split,
                f"{r.tokens_compared} {unit}",
                "-" if r.first_divergence is None else str(r.first_divergence),
                f"{r.single_tokens_per_s:.1f}",
                f"{r.cluster_tokens_per_s:.1f}",
                verdict,
            )
        )
    widths = [max([display_width(c), *(display_width(row[i]) for row in rows)]) for i, c in enumerate(_COLUMNS)]
    right = {3, 4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        padded = (_pad(c, w, right=i in right) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    out = [line(_COLUMNS), "  ".join("-" * w for w in widths)]
    out += [line(row).rstrip() for row in rows]
    for r in results:
        if r.error:
            out.append(f"error: {Prompt.of(r.prompt).short()} {r.mode} split {r.split}: {r.error}")
    return "\n".join(out)


def format_summary(results: Sequence[ComparisonResult]) -> str:
    same = sum(r.identical for r in results)
    return f"{same}/{len(results)} runs identical to the single device"


def format_deterministic(r: DeterministicResult) -> str:
    verdict = "equal" if r.all_equal else "NOT equal"
    runs = "agree" if r.cluster_consistent else "DISAGREE"
    single = "matches" if r.matches_single else "DIFFERS"
    return (
        f"deterministic (seed {r.seed}, split {r.split}): {len(r.cluster_runs)} cluster runs {runs},"
        f" single device {single} -> {verdict}"
    )


def format_stress(r: StressTestResult) -> str:
    lines = [
        f"stress (split {r.split}, concurrency {r.concurrency}, {r.duration_s:.1f}s): {r.requests} requests, "
        f"{r.tokens} tokens, {r.mismatches} mismatches, {r.errors} errors, {r.tokens_per_s:.1f} tokens/s, "
        f"latency p50 {r.p50_latency_s * 1000:.0f} ms p99 {r.p99_latency_s * 1000:.0f} ms",
    ]
    for m in r.examples:
        where = "-" if m.first_divergence is None else str(m.first_divergence)
        kind = "error" if m.error else "mismatch"
        detail = f": {m.error}" if m.error else ""
        lines.append(f"  {kind}: {Prompt.of(m.prompt).short()} {m.mode} at {where}{detail}")
    return "\n".join(lines)
