"""What the request owner keeps and decides without IO: its errors (:class:`NoPlan`, :class:`PipelineFailed`,
:class:`CorruptOutput`), its settings (:class:`OwnerConfig`), one owned request's state (:class:`Owned`), its
counters (:class:`OwnerStats`, :class:`ValidationCounters`) and the rules it applies to a failure: which kind a
stage's report is (:func:`failure_kind`), whether a new plan moved any stage (:func:`stages_changed`), which
kinds make a node suspect (:data:`SUSPECT_KINDS`). The owner itself is :mod:`exo_stable.pipeline.owner`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from exo_stable.pipeline.assembler import AssemblyStep, StreamAssembler
from exo_stable.pipeline.levels import (
    DEFAULT_SPOT_CHECK_FRACTION,
    AdaptiveConfig,
    DeltaChecker,
    OutputWatch,
    ValidationLevel,
)
from exo_stable.pipeline.recovery import FailureKind, ReplayMode
from exo_stable.pipeline.service import ServiceUnavailable
from exo_stable.pipeline.trace import RequestTrace
from exo_stable.wire.messages import (
    Message,
    PlanCommit,
    StageFailure,
    TokenChunk,
)

Send = Callable[[str, Message], Awaitable[None]]


class NoPlan(ServiceUnavailable):
    """The cluster has no committed plan yet."""


class PipelineFailed(ServiceUnavailable):
    """A stage reported that it cannot run the request, or the pipeline stalled past its deadline."""

    def __init__(self, message: str, *, kind: FailureKind = FailureKind.STAGE_FAILURE, node_id: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.node_id = node_id


@dataclass(frozen=True, slots=True)
class OwnerConfig:
    open_timeout_s: float = 10.0
    open_retries: int = 2
    first_token_timeout_s: float = 300.0
    token_timeout_s: float = 60.0
    inbox_size: int = 1024
    max_recoveries: int = 6
    recovery_timeout_s: float = 120.0
    replay: ReplayMode = ReplayMode.EXACT
    validation: ValidationLevel = ValidationLevel.LIGHT  # requests that do not ask for a level run at this one
    spot_check_fraction: float = DEFAULT_SPOT_CHECK_FRACTION  # strict: the share of steps recomputed
    spot_check_seed: int = 0
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)


class CorruptOutput(RuntimeError):
    """A text delta failed its validation at the owner (it is never sent): the request ends with an error."""


@dataclass
class ValidationCounters:
    """What the owner's validation found, over the node's life (for /health and adaptive strictness)."""

    requests: dict[str, int]
    token_checksum_failures: int = 0
    tokens_rejected: int = 0
    invalid_utf8_deltas: int = 0
    suspicious_deltas: int = 0
    output_findings: int = 0  # the CorruptionDetector's, on the assembled text (pipeline/levels.py)


@dataclass
class Owned:
    assembler: StreamAssembler
    plan: PlanCommit
    inbox: asyncio.Queue[TokenChunk | StageFailure]
    overflowed: bool = False
    mode: ReplayMode = ReplayMode.EXACT
    failed_at: float | None = None  # set while the request recovers: the failure that paused its stream
    on_fallback: bool = False  # runs on this node's single-device fallback (no plan fits the survivors)
    level: ValidationLevel = ValidationLevel.LIGHT
    deltas: DeltaChecker | None = None
    output: OutputWatch = field(default_factory=lambda: OutputWatch(ValidationLevel.OFF))
    trace: RequestTrace | None = None  # the request's trace, when the caller keeps one
    first_token_s: float | None = None  # seconds from the start of the request to its first accepted token


@dataclass
class OwnerStats:
    requests: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    late_messages: int = 0
    resend_requests: int = 0
    recoveries: int = 0
    fallbacks: int = 0
    kept_plan: int = 0  # running requests that kept their plan while a newer one was committed


SUSPECT_KINDS = frozenset(
    {FailureKind.STAGE_FAILURE, FailureKind.STAGE_ESCALATED, FailureKind.CHECKSUM, FailureKind.STEP_DEADLINE}
)
"""Failures that, repeated, make a node suspect (a lost node is gone anyway; a replaced plan is no fault)."""


def trace_token(trace: RequestTrace, token: TokenChunk, step: AssemblyStep) -> None:
    """A token's forward steps go into the request's trace once (not again with a duplicate or a resend)."""
    if not step.duplicate and step.rejected is None:
        trace.hops(token.hops, lost=token.hops_lost)
    if step.missing:
        trace.resend(step.missing)


def drain(queue: asyncio.Queue[TokenChunk | StageFailure]) -> None:
    """Drop what the failed attempt left behind (stale epochs would be rejected anyway)."""
    while not queue.empty():
        queue.get_nowait()


def stages_changed(old: PlanCommit, new: PlanCommit) -> bool:
    """Whether any node of ``old`` holds different layers (or none) in ``new``."""
    now = {s.node_id: (s.start, s.end) for s in new.stages}
    return any(now.get(s.node_id) != (s.start, s.end) for s in old.stages)


def failure_kind(detail: str) -> FailureKind:
    """The kind of a stage's reported failure (node-down notices come from this node's own membership)."""
    if detail.startswith("node ") and detail.endswith(" is down"):
        return FailureKind.NODE_LOST
    if detail.startswith("plan "):
        return FailureKind.PLAN_REPLACED
    if detail.startswith("bad activation"):
        return FailureKind.CHECKSUM
    if detail.startswith("spot check"):
        return FailureKind.SPOT_CHECK
    return FailureKind.STAGE_FAILURE
