"""What a stage keeps and is set up with, apart from the actor that does the work: its settings
(:class:`StageConfig`), one request's state on the stage (:class:`StageRequest`), its counters
(:class:`StageStats`), the timing record of a step (:class:`Timing`), the chaos tests'
stage faults named in the environment (:func:`stage_faults`) and the request level as the owner sent it
(:func:`wire_level`). No IO, no MLX; the actor is :mod:`exo_stable.pipeline.stage`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from exo_stable.engine.modelspec import Dtype
from exo_stable.pipeline.levels import ValidationLevel
from exo_stable.pipeline.stagebatch import BATCH_BUCKETS, QUEUE_BUCKETS, SmallHistogram
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

STAGE_FAULTS_ENV = "EXO_STABLE_STAGE_FAULTS"
"""Injected stage faults, for chaos tests: ``crash_every_step`` makes every forward step raise (the actor
crashes, its supervisor restarts it, and past its restart intensity escalates)."""


class InjectedStageCrash(RuntimeError):
    """A crash injected by ``EXO_STABLE_STAGE_FAULTS=crash_every_step``."""


def stage_faults(environ: dict[str, str] | None = None) -> frozenset[str]:
    """The stage faults named in the environment; unknown names are refused (a typo must not pass silently)."""
    raw = (os.environ if environ is None else environ).get(STAGE_FAULTS_ENV, "")
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
    batch_size: SmallHistogram = field(default_factory=lambda: SmallHistogram(BATCH_BUCKETS))  # rows per call
    queue_depth: SmallHistogram = field(default_factory=lambda: SmallHistogram(QUEUE_BUCKETS))  # steps waiting


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
    max_batch: int = 16  # decode steps of this many requests share one forward call (1: one at a time)
    step_token_budget: int = 512  # positions per compute step: decode rows plus prompt chunks (one at least)
    max_queued_steps: int = 64  # ready steps waiting for the compute thread; past it, the stage takes no more


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
