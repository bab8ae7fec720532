"""Check invariant I1 end to end: a split model answers token for token like one device.

The :class:`DistributedInferenceValidator` runs prompts through a single-device reference (an in-process
:class:`~exo_stable.engine.single.SingleDeviceEngine`) and through a cluster, greedy and with seeded sampling, and
compares the two. A cluster is either started here (:func:`in_process_cluster`: N nodes over real sockets
on 127.0.0.1, re-split at will; token ids are compared) or an existing one reached over its OpenAI API
(:class:`RemoteCluster`; the API does not return token ids, so the text is compared).

The comparison, results and reports are pure and live in :mod:`exo_stable.verify.results`; the reference and
the cluster targets in :mod:`exo_stable.verify.targets`; this module holds the validator and the command.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from exo_stable.engine.loader import open_model
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import SamplingParams
from exo_stable.pipeline.service import ServiceUnavailable
from exo_stable.tokenizer import ChatMessage
from exo_stable.verify.results import (
    DEFAULT_PROMPTS,
    GREEDY,
    ComparisonResult,
    DeterministicResult,
    Generation,
    Mismatch,
    Prompt,
    StressTestResult,
    all_splits,
    compare_sequences,
    display_width,
    even_split,
    first_divergence,
    format_deterministic,
    format_stress,
    format_summary,
    format_table,
    load_prompts,
    mode_name,
    parse_duration,
    percentile,
    seeded,
    text_divergence_token,
)
from exo_stable.verify.targets import ClusterTarget, InProcessCluster, RemoteCluster, SingleDevice, in_process_cluster

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
    "GREEDY",
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
    "VerifySetupError",
    "all_splits",
    "compare_sequences",
    "display_width",
    "even_split",
    "first_divergence",
    "format_table",
    "in_process_cluster",
    "load_prompts",
    "parse_duration",
    "percentile",
    "run_verify",
    "seeded",
    "text_divergence_token",
]
