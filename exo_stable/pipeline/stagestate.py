"""What a stage keeps and is set up with, apart from the actor that does the work: its settings
(:class:`StageConfig`), one request's state on the stage (:class:`StageRequest`), its counters
(:class:`StageStats`) and what it reports (:class:`StageStatistics`), the timing records of a step
(:class:`Arrival`, :class:`Timing`), the chaos tests' stage faults named in the environment
(:func:`stage_faults`) and the request level as the owner sent it (:func:`wire_level`). No IO, no MLX; the actor
is :mod:`exo_stable.pipeline.stage`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from exo_stable import settings
from exo_stable.engine.batching import BatchMode
from exo_stable.engine.histogram import BATCH_BUCKETS, QUEUE_BUCKETS, Histogram
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.slicing import PREFILL_SHARE, SlicedForward
from exo_stable.engine.stagecompute import ComputeStats
from exo_stable.pipeline.levels import ValidationLevel
from exo_stable.wire.messages import (
    ActivationChunk,
    Message,
    RequestClose,
    RequestOpen,
    ResendTokens,
    StageRange,
    StepHop,
    StepInput,
    TokenChunk,
)

Send = Callable[[str, Message], Awaitable[None]]
StageMessage = RequestOpen | StepInput | ActivationChunk | RequestClose | ResendTokens

MAX_PENDING_HOPS = 1024
"""Trace hops the last stage holds for a request between tokens (prompt chunks, replayed positions)."""

STAGE_FAULTS_ENV = settings.STAGE_FAULTS.name
"""Injected stage faults, for chaos tests: ``crash_every_step`` makes every forward step raise (the actor
crashes, its supervisor restarts it, and past its restart intensity escalates)."""


class InjectedStageCrash(RuntimeError):
    """A crash injected by ``EXO_STABLE_STAGE_FAULTS=crash_every_step``."""


def stage_faults(environ: dict[str, str] | None = None) -> frozenset[str]:
    """The stage faults named in the environment; unknown names are refused (a typo must not pass silently)."""
    raw = settings.STAGE_FAULTS.get(environ)
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = names - {"crash_every_step"}
    if unknown:
        raise ValueError(f"{STAGE_FAULTS_ENV}: unknown stage faults {sorted(unknown)}")
    return names


@dataclass
class StageRequest:
    owner: str
    plan_epoch: int
    max_tokens: int
    history: tuple[int, ...] = ()  # tokens of a replay: fed forward instead of sampled
    first_position: int = 0  # a fast replay: the first position this stage samples (the rest was re-prefilled)
    sent: list[TokenChunk] = field(default_factory=list)  # last stage: every token sent, for resends
    level: ValidationLevel = ValidationLevel.LIGHT  # what this stage checks for the request (pipeline/levels.py)
    spot_fraction: float = 0.0  # strict: the share of steps recomputed and compared bit for bit
    spot_seed: int = 0
    pending_hops: list[StepHop] = field(default_factory=list)  # last stage: steps not yet behind a sent token
    hops_lost: int = 0  # hops past MAX_PENDING_HOPS, counted and dropped
    greedy: bool = False
    decoding: bool = False  # a decode step of it has come here (its prompt is read)


@dataclass
class StageStats:
    steps: int = 0
    tokens_sent: int = 0
    stale_steps: int = 0
    resent: int = 0
    bad_activations: int = 0
    failures: int = 0
    replayed: int = 0
    replay_divergences: int = 0
    source_checksum_failures: int = 0  # strict: activations whose sender's checksum did not match (also bad)
    spot_checks: int = 0  # strict: steps computed twice
    spot_check_mismatches: int = 0  # ... whose two results differed
    refused_per_owner: int = 0  # request opens past the per-owner share of the slots
    build_ahead_busy: int = 0  # next steps not built ahead because the stage served other requests too
    batched_rows: int = 0  # decode steps computed in a forward call shared with other requests' steps
    prompt_slices: int = 0  # compute steps that evaluated part of a prompt chunk's layers (engine.slicing)
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))  # rows per call
    queue_depth: Histogram = field(default_factory=lambda: Histogram(QUEUE_BUCKETS))  # steps waiting


@dataclass(frozen=True, slots=True)
class StageStatistics:
    """A snapshot of this node's stage (``StageActor.statistics()``; the host adds its plan and draining
    stages): the counters are copies, taken when the snapshot was."""

    layers: tuple[int, int]
    open_requests: int
    kv_cache_bytes: int
    load_s: float
    counters: StageStats
    compute: ComputeStats
    faults_injected: Mapping[str, int] | None = None
    epoch: int | None = None
    draining: tuple[str, ...] = ()
    batch_limit: int = 1  # rows one forward call may take (StageConfig.batch_limit)
    queued: int = 0  # ready steps waiting for the compute thread

    def as_dict(self) -> dict[str, Any]:
        """As ``/health`` shows it."""
        st, c = self.counters, self.compute
        return {
            "layers": list(self.layers),
            "open_requests": self.open_requests,
            "kv_cache_bytes": self.kv_cache_bytes,
            "load_s": round(self.load_s, 3),
            "steps": st.steps,
            "tokens_sent": st.tokens_sent,
            "stale_steps": st.stale_steps,
            "replayed": st.replayed,
            "decode_ahead": {
                "steps": c.steps_ahead,
                "undone": c.steps_undone,
                "batched_steps": c.rows_ahead,
                "batched_undone": c.rows_undone,
            },
            "build_ahead": {
                "prepared": c.steps_prepared,
                "used": c.prepared_used,
                "undone": c.prepared_undone,
                "prepare_s": round(c.prepare_seconds, 3),
                "skipped_busy": st.build_ahead_busy,
            },
            "replay_divergences": st.replay_divergences,
            "batching": {
                "batch_limit": self.batch_limit,
                "queued": self.queued,
                "batched_rows": st.batched_rows,
                "shared_buffer_calls": c.shared_calls,
                "prompt_slices": st.prompt_slices,
                "forward_calls": st.batch_size.count,
                "mean_batch": round(st.batch_size.mean(), 3),
                "compute_s": round(c.forward_seconds, 3),
                "batch_size": dict(st.batch_size.labelled("{:g}".format)),
                "queue_depth": dict(st.queue_depth.labelled("{:g}".format)),
            },
            "validation": {
                "bad_activations": st.bad_activations,
                "source_checksum_failures": st.source_checksum_failures,
                "spot_checks": st.spot_checks,
                "spot_check_mismatches": st.spot_check_mismatches,
                "faults_injected": None if self.faults_injected is None else dict(self.faults_injected),
            },
            "epoch": self.epoch,
            "draining": list(self.draining),
        }


@dataclass(frozen=True, slots=True)
class StageConfig:
    node_id: str
    plan_epoch: int
    stages: tuple[StageRange, ...]
    index: int
    dtype: Dtype
    max_requests: int = 16
    max_requests_per_owner: int = 12  # one owner node may hold this many of the slots (the others keep some)
    load_timeout_s: float = 600.0
    step_timeout_s: float = 120.0
    send_timeout_s: float = 30.0
    decode_ahead: bool = True  # a one-stage plan queues each greedy step before its token is read
    build_ahead: bool = True  # build each decode step's graph while the other stages compute (prepare)
    batch: BatchMode = BatchMode.EXACT  # StageCompute's batching of decode steps (engine.batching)
    batch_limit: int = 16  # rows per forward call at most (the stage's batch; 1: one step at a time)
    step_token_budget: int = 512  # positions per compute step: decode rows plus prompt chunks (one at least)
    prefill_share: float | None = PREFILL_SHARE  # a prompt slice's time against the decode rows' (None: whole)
    max_queued_steps: int = 64  # ready steps waiting for the compute thread; past it, the stage takes no more


class Reading(NamedTuple):
    """A prompt chunk's step whose call is being evaluated a few layers per turn (engine.slicing)."""

    ready: Any  # its ReadyStep
    call: SlicedForward
    checks: tuple[ValidationLevel, bool]  # its level, and whether it is spot-checked


class Arrival(NamedTuple):
    """When a stage took a step in: wall clock (comparable across the nodes of one host) and perf counter."""

    wall: float
    clock: float


class Timing(NamedTuple):
    received_at: float
    stage_s: float
    compute_s: float


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """On the compute thread: ``fn(*args)`` and the seconds it took there."""
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


class SpotCheckMismatch(RuntimeError):
    """A step computed twice on this stage gave two different results (strict validation)."""


def wire_level(text: str) -> ValidationLevel:
    """A request's level as the owner sent it; one this node does not know is treated as ``strict``."""
    try:
        return ValidationLevel(text)
    except ValueError:
        return ValidationLevel.STRICT
