"""Check invariant I1 end to end: a split model answers token for token like one device.

The :class:`DistributedInferenceValidator` runs prompts through a single-device reference (an in-process
:class:`~exo_stable.engine.SingleDeviceEngine`) and through a cluster, greedy and with seeded sampling, and
compares the two. A cluster is either started here (:func:`in_process_cluster`: N nodes over real sockets
on 127.0.0.1, re-split at will; token ids are compared) or an existing one reached over its OpenAI API
(:class:`RemoteCluster`; the API does not return token ids, so the text is compared).

The comparison itself (:func:`first_divergence`, :func:`compare_sequences`) is pure and separate.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, TypeVar

from exo_stable.engine import SingleDeviceEngine
from exo_stable.loader import ModelSource, open_model
from exo_stable.modelspec import Dtype
from exo_stable.node import Node, NodeConfig
from exo_stable.sampling import SamplingParams
from exo_stable.service import GenerationJob, GenerationResult, InferenceService, ServiceUnavailable
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


# --- generations and targets -------------------------------------------------------------------------


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


class ClusterTarget(Protocol):
    """Something that runs a prompt on a cluster."""

    @property
    def unit(self) -> Unit: ...

    def describe(self) -> str: ...

    async def generate(
        self, prompt: Prompt, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int
    ) -> Generation: ...


class SingleDevice:
    """The reference: the whole model on one in-process engine, results cached per (prompt, sampling)."""

    def __init__(self, source: ModelSource, dtype: Dtype, *, request_timeout_s: float = 300.0) -> None:
        self.source = source
        self.engine = SingleDeviceEngine(source, dtype=dtype)
        self.service = InferenceService(self.engine, max_active=16, admission_timeout_s=request_timeout_s)
        self.request_timeout_s = request_timeout_s
        self._cache: dict[tuple[Prompt, SamplingParams, int], Generation] = {}
        self._locks: dict[tuple[Prompt, SamplingParams, int], asyncio.Lock] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        return self.source.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode_chat(list(prompt.messages))

    async def __aenter__(self) -> SingleDevice:
        await self.engine.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.engine.close()

    async def generate(self, prompt: Prompt, params: SamplingParams, max_tokens: int) -> Generation:
        key = (prompt, params, max_tokens)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._cache:
                self._cache[key] = await self._run(self.encode(prompt), params, max_tokens)
            return self._cache[key]

    async def _run(self, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int) -> Generation:
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        text = ""
        started = time.perf_counter()
        async with asyncio.timeout(self.request_timeout_s):
            await self.service.admit()
            try:
                job = GenerationJob(prompt_ids, params, max_tokens)
                async with aclosing(self.service.stream(job, result)) as deltas:
                    async for delta in deltas:
                        text += delta.text
            finally:
                self.service.release()
        seconds = time.perf_counter() - started
        return Generation(tuple(result.token_ids), text, len(result.token_ids), seconds, result.finish_reason)


class InProcessCluster:
    """N nodes of this process over real sockets on 127.0.0.1; made by :func:`in_process_cluster`."""

    unit: Unit = "ids"

    def __init__(self, nodes: list[Node], *, request_timeout_s: float, plan_timeout_s: float) -> None:
        self.nodes = nodes
        self.request_timeout_s = request_timeout_s
        self.plan_timeout_s = plan_timeout_s
        self._owners = itertools.count()

    @property
    def split(self) -> tuple[int, ...]:
        plan = self.nodes[0].coordinator.active
        return () if plan is None else tuple(s.end - s.start for s in plan.stages)

    def describe(self) -> str:
        return split_label(self.split)

    async def resplit(self, split: tuple[int, ...]) -> None:
        """Commit a plan with these layers per stage and wait until every node runs it."""
        leader = min(self.nodes, key=lambda nd: nd.node_id)
        leader.coordinator.force_split(split)
        async with asyncio.timeout(self.plan_timeout_s):
            for node in self.nodes:
                await node.coordinator.wait_plan_where(
                    lambda p: tuple(s.end - s.start for s in p.stages) == split, timeout=self.plan_timeout_s
                )

    async def generate(
        self, prompt: Prompt, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int
    ) -> Generation:
        node = self.nodes[next(self._owners) % len(self.nodes)]  # any node can own a request
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        text = ""
        started = time.perf_counter()
        async with asyncio.timeout(self.request_timeout_s):
            job = GenerationJob(prompt_ids, params, max_tokens)
            async with aclosing(node.owner.stream(job, result)) as deltas:
                async for delta in deltas:
                    text += delta.text
        seconds = time.perf_counter() - started
        return Generation(tuple(result.token_ids), text, len(result.token_ids), seconds, result.finish_reason)


@asynccontextmanager
async def in_process_cluster(
    model: Path,
    dtype: Dtype,
    split: tuple[int, ...],
    *,
    max_concurrent: int = 8,
    start_timeout_s: float = 120.0,
    stop_timeout_s: float = 60.0,
    request_timeout_s: float = 300.0,
    name: str = "verify",
) -> AsyncIterator[InProcessCluster]:
    """Start ``len(split)`` nodes with ``split`` layers per stage; stop them all on exit (with a deadline)."""
    n = len(split)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            try:
                nodes: list[Node] = []
                for i in range(n):
                    config = NodeConfig(
                        model=model,
                        dtype=dtype,
                        port=0,
                        node_id=f"{name}{n}-{i}",
                        split=split,
                        max_concurrent=max_concurrent,
                        shutdown_timeout_s=5.0,
                    )
                    node = Node(config, open_model(model))
                    nodes.append(node)
                    tasks.append(tg.create_task(node.run(stop=stop, handle_signals=False), name=config.node_id))
                async with asyncio.timeout(start_timeout_s):
                    first = await nodes[0].wait_listening(timeout=start_timeout_s)
                    for node in nodes[1:]:
                        await node.wait_listening(timeout=start_timeout_s)
                        node.peers.dial("127.0.0.1", first)
                    for node in nodes:
                        await node.coordinator.wait_plan_where(
                            lambda p: tuple(s.end - s.start for s in p.stages) == split, timeout=start_timeout_s
                        )
                yield InProcessCluster(nodes, request_timeout_s=request_timeout_s, plan_timeout_s=start_timeout_s)
            finally:
                stop.set()
                if tasks:
                    _, pending = await asyncio.wait(tasks, timeout=stop_timeout_s)
                    for task in pending:
                        task.cancel()
    except BaseExceptionGroup as group:
        # The TaskGroup wraps whatever ended the block; one failure is reported as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class RemoteCluster:
    """An existing cluster reached through the OpenAI API of its nodes (requests go round-robin)."""

    unit: Unit = "text"

    def __init__(self, urls: Sequence[str], *, api_key: str | None = None, request_timeout_s: float = 300.0) -> None:
        if not urls:
            raise ValueError("no node URLs given")
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.api_key = api_key
        self.request_timeout_s = request_timeout_s
        self._owners = itertools.count()
        self._session: Any = None
        self._plan = "remote"

    def describe(self) -> str:
        return self._plan

    async def __aenter__(self) -> RemoteCluster:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.request_timeout_s)
        )
        try:
            self._plan = await self._describe_plan()
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def models(self) -> list[str]:
        body = await self._get(self.urls[0] + "/v1/models")
        return [str(m.get("id")) for m in body.get("data", [])]

    async def _get(self, url: str) -> dict[str, Any]:
        import aiohttp

        try:
            async with asyncio.timeout(30.0), self._session.get(url) as response:
                response.raise_for_status()
                body: dict[str, Any] = await response.json()
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectionError(f"cannot reach {url}: {exc!r}") from exc

    async def _describe_plan(self) -> str:
        await self.models()  # fails early when the first node is unreachable
        try:
            view = await self._get(self.urls[0] + "/v1/cluster")
        except ConnectionError:
            return "remote"
        plan = view.get("plan") or {}
        stages = plan.get("stages") or []
        if not stages:
            return "remote (no plan)"
        return split_label([int(s["end"]) - int(s["start"]) for s in stages])

    async def generate(
        self, prompt: Prompt, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int
    ) -> Generation:
        url = self.urls[next(self._owners) % len(self.urls)] + "/v1/chat/completions"
        body = {
            "messages": [{"role": m.role, "content": m.content} for m in prompt.messages],
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
            "stream": False,
        }
        started = time.perf_counter()
        async with asyncio.timeout(self.request_timeout_s), self._session.post(url, json=body) as response:
            if response.status != 200:
                raise ServiceUnavailable(f"{url}: HTTP {response.status}: {(await response.text())[:200]}")
            reply: dict[str, Any] = await response.json()
        seconds = time.perf_counter() - started
        choice = reply["choices"][0]
        tokens = int(reply.get("usage", {}).get("completion_tokens", 0))
        return Generation(None, str(choice["message"]["content"] or ""), tokens, seconds, choice.get("finish_reason"))


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


# --- the validator -----------------------------------------------------------------------------------

_REQUEST_ERRORS: tuple[type[BaseException], ...] = (ServiceUnavailable, ConnectionError, TimeoutError, OSError)


class DistributedInferenceValidator:
    """Compares a cluster with the single device (design.md, "Validation Framework")."""

    def __init__(
        self,
        reference: SingleDevice,
        cluster: ClusterTarget,
        *,
        max_tokens: int = 24,
        seed: int = 7,
        prompts: Sequence[Prompt] = DEFAULT_PROMPTS,
        concurrency: int = 4,
    ) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.reference = reference
        self.cluster = cluster
        self.max_tokens = max_tokens
        self.seed = seed
        self.prompts = list(prompts)
        self.concurrency = concurrency

    def modes(self) -> list[SamplingParams]:
        return [GREEDY, seeded(self.seed)]

    def _diverge(self, single: Generation, cluster: Generation) -> tuple[int, bool, int | None]:
        """(compared, identical, first divergence) in the cluster's unit."""
        if self.cluster.unit == "ids" and cluster.token_ids is not None:
            cmp = compare_sequences(single.token_ids or (), cluster.token_ids)
            return cmp.compared, cmp.identical, cmp.first_divergence
        identical = single.text == cluster.text
        at = None
        if not identical:
            at = text_divergence_token(self.reference.tokenizer, single.token_ids or (), cluster.text)
            at = at if at is not None else len(single.token_ids or ())
        return max(single.tokens, cluster.tokens), identical, at

    async def compare_single_vs_distributed(
        self, prompt: str | Sequence[ChatMessage] | Prompt, params: SamplingParams = GREEDY
    ) -> ComparisonResult:
        p = Prompt.of(prompt)
        single = await self.reference.generate(p, params, self.max_tokens)
        split = self.cluster.describe()
        try:
            cluster = await self.cluster.generate(p, self.reference.encode(p), params, self.max_tokens)
        except _REQUEST_ERRORS as exc:
            return ComparisonResult(
                prompt=p.label,
                mode=mode_name(params),
                split=split,
                unit=self.cluster.unit,
                tokens_compared=len(single.token_ids or ()),
                identical=False,
                first_divergence=0,
                single_tokens=single.token_ids or (),
                cluster_tokens=None,
                single_text=single.text,
                cluster_text="",
                single_seconds=single.seconds,
                cluster_seconds=0.0,
                single_tokens_per_s=single.tokens_per_s,
                cluster_tokens_per_s=0.0,
                error=f"{type(exc).__name__}: {exc}",
            )
        compared, identical, at = self._diverge(single, cluster)
        return ComparisonResult(
            prompt=p.label,
            mode=mode_name(params),
            split=split,
            unit=self.cluster.unit,
            tokens_compared=compared,
            identical=identical,
            first_divergence=at,
            single_tokens=single.token_ids or (),
            cluster_tokens=cluster.token_ids,
            single_text=single.text,
            cluster_text=cluster.text,
            single_seconds=single.seconds,
            cluster_seconds=cluster.seconds,
            single_tokens_per_s=single.tokens_per_s,
            cluster_tokens_per_s=cluster.tokens_per_s,
        )

    async def compare_all(self) -> list[ComparisonResult]:
        """Every prompt, greedy and seeded, on the cluster's current split."""
        return [
            await self.compare_single_vs_distributed(p, params)
            for p, params in itertools.product(self.prompts, self.modes())
        ]

    async def run_deterministic_test(
        self, seed: int, prompt: str | Sequence[ChatMessage] | Prompt, *, runs: int = 2
    ) -> DeterministicResult:
        """The same seed twice on the cluster (different owners) and once on the single device."""
        p = Prompt.of(prompt)
        params = seeded(seed)
        single = await self.reference.generate(p, params, self.max_tokens)
        ids = self.reference.encode(p)
        cluster_runs = tuple([await self.cluster.generate(p, ids, params, self.max_tokens) for _ in range(runs)])

        def key(g: Generation) -> tuple[int, ...] | str:
            return g.token_ids if self.cluster.unit == "ids" and g.token_ids is not None else g.text

        consistent = all(key(g) == key(cluster_runs[0]) for g in cluster_runs)
        _, identical, at = self._diverge(single, cluster_runs[0])
        return DeterministicResult(
            p.label, seed, self.cluster.describe(), single, cluster_runs, consistent, identical, at
        )

    async def stress_test_pipeline(
        self, duration: timedelta | float, *, concurrency: int | None = None, rng_seed: int | None = None
    ) -> StressTestResult:
        """Keep ``concurrency`` requests going for ``duration``, each compared with its single-device result."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
        workers = concurrency or self.concurrency
        rng = random.Random(self.seed if rng_seed is None else rng_seed)
        jobs = list(itertools.product(self.prompts, self.modes()))
        # The references first, so that the single device does not compete with the cluster for the CPU.
        for p, params in jobs:
            await self.reference.generate(p, params, self.max_tokens)
        latencies: list[float] = []
        examples: list[Mismatch] = []
        counts = {"requests": 0, "tokens": 0, "mismatches": 0, "errors": 0}
        counter = itertools.count()
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                p, _ = rng.choice(jobs)
                params = self.modes()[next(counter) % 2]  # greedy and seeded alternately
                single = await self.reference.generate(p, params, self.max_tokens)
                t0 = time.perf_counter()
                try:
                    got = await self.cluster.generate(p, self.reference.encode(p), params, self.max_tokens)
                except _REQUEST_ERRORS as exc:
                    counts["requests"] += 1
                    counts["errors"] += 1
                    if len(examples) < 5:
                        examples.append(Mismatch(p.label, mode_name(params), None, f"{type(exc).__name__}: {exc}"))
                    continue
                latencies.append(time.perf_counter() - t0)
                counts["requests"] += 1
                counts["tokens"] += got.tokens
                _, identical, at = self._diverge(single, got)
                if not identical:
                    counts["mismatches"] += 1
                    if len(examples) < 5:
                        examples.append(Mismatch(p.label, mode_name(params), at))

        async with asyncio.TaskGroup() as tg:
            for i in range(workers):
                tg.create_task(worker(), name=f"stress-{i}")
        elapsed = time.perf_counter() - started
        return StressTestResult(
            split=self.cluster.describe(),
            duration_s=elapsed,
            concurrency=workers,
            requests=counts["requests"],
            tokens=counts["tokens"],
            mismatches=counts["mismatches"],
            errors=counts["errors"],
            tokens_per_s=counts["tokens"] / elapsed if elapsed > 0 else 0.0,
            p50_latency_s=percentile(latencies, 50),
            p99_latency_s=percentile(latencies, 99),
            examples=tuple(examples),
        )


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


# --- the command -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    model: Path
    dtype: Dtype
    stages: tuple[int, ...] = (2, 3)
    every_split: bool = False
    nodes: tuple[str, ...] = ()
    api_key: str | None = None
    max_tokens: int = 24
    seed: int = 7
    prompts: tuple[Prompt, ...] = DEFAULT_PROMPTS
    stress: timedelta | None = None
    concurrency: int = 4
    request_timeout_s: float = 300.0


class VerifySetupError(RuntimeError):
    """The clusters or the reference could not be set up (exit status 2)."""


async def run_verify(options: VerifyOptions, out: TextIO, note: Callable[[str], None]) -> bool:
    """Run the whole verification, print reports to ``out``; True when everything was identical."""
    source = open_model(options.model)
    layers = source.spec.num_hidden_layers
    ok = True
    async with SingleDevice(source, options.dtype, request_timeout_s=options.request_timeout_s) as reference:

        def validator(cluster: ClusterTarget) -> DistributedInferenceValidator:
            return DistributedInferenceValidator(
                reference,
                cluster,
                max_tokens=options.max_tokens,
                seed=options.seed,
                prompts=options.prompts,
                concurrency=options.concurrency,
            )

        results: list[ComparisonResult] = []
        extra: list[str] = []
        if options.nodes:
            try:
                remote = RemoteCluster(
                    options.nodes, api_key=options.api_key, request_timeout_s=options.request_timeout_s
                )
                await remote.__aenter__()
            except ConnectionError as exc:
                raise VerifySetupError(str(exc)) from exc
            try:
                names = await remote.models()
                if source.name not in names:
                    note(f"note: the cluster serves {names}, the reference is {source.name}: same weights?")
                v = validator(remote)
                note(f"comparing {len(options.prompts) * 2} runs with {options.nodes[0]} (text: the API gives no ids)")
                results += await v.compare_all()
                det = await v.run_deterministic_test(options.seed, options.prompts[0])
                extra.append(format_deterministic(det))
                ok = ok and det.all_equal
                if options.stress is not None:
                    note(f"stress test for {options.stress.total_seconds():.0f}s")
                    stress = await v.stress_test_pipeline(options.stress)
                    extra.append(format_stress(stress))
                    ok = ok and stress.ok
            finally:
                await remote.__aexit__(None, None, None)
        else:
            for n in options.stages:
                splits = all_splits(layers, n) if options.every_split else [even_split(layers, n)]
                note(f"{n} stages: {len(splits)} split(s) x {len(options.prompts) * 2} runs")
                try:
                    cm = in_process_cluster(
                        options.model,
                        options.dtype,
                        splits[0],
                        max_concurrent=max(8, options.concurrency),
                        request_timeout_s=options.request_timeout_s,
                    )
                    async with cm as cluster:
                        v = validator(cluster)
                        for split in splits:
                            if cluster.split != split:
                                await cluster.resplit(split)
                            results += await v.compare_all()
                        det = await v.run_deterministic_test(options.seed, options.prompts[0])
                        extra.append(format_deterministic(det))
                        ok = ok and det.all_equal
                        if options.stress is not None:
                            await cluster.resplit(even_split(layers, n))
                            note(f"stress test for {options.stress.total_seconds():.0f}s on {cluster.describe()}")
                            stress = await v.stress_test_pipeline(options.stress)
                            extra.append(format_stress(stress))
                            ok = ok and stress.ok
                except* TimeoutError as group:
                    raise VerifySetupError(f"the {n}-node cluster did not come up or re-split in time") from group
        print(format_table(results), file=out)
        for line in extra:
            print(line, file=out)
        print(format_summary(results), file=out)
        return ok and all(r.identical for r in results)


__all__ = [
    "DEFAULT_PROMPTS",
    "ComparisonResult",
    "DeterministicResult",
    "DistributedInferenceValidator",
    "Generation",
    "InProcessCluster",
    "Prompt",
    "RemoteCluster",
    "SingleDevice",
    "StressTestResult",
    "VerifyOptions",
    "all_splits",
    "compare_sequences",
    "even_split",
    "first_divergence",
    "in_process_cluster",
    "parse_duration",
    "run_verify",
]
