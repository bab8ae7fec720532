"""What the request owner keeps and decides without IO: its errors (:class:`NoPlan`, :class:`PipelineFailed`,
:class:`CorruptOutput`), its settings (:class:`OwnerConfig`), one owned request's state (:class:`Owned`), its
counters (:class:`OwnerStats`, :class:`ValidationCounters`), what it reports (:class:`OwnerStatistics`) and the
rules it applies to a failure: which kind a stage's report is (:func:`failure_kind`) or its refused open
(:func:`open_refusal_kind`), whether a new plan moved any stage (:func:`stages_changed`), which kinds make a
node suspect (:data:`SUSPECT_KINDS`). The owner itself is :mod:`exo_stable.pipeline.owner`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from exo_stable.pipeline.assembler import AssemblyStep, StreamAssembler
from exo_stable.pipeline.fallback import FallbackStatistics
from exo_stable.pipeline.levels import (
    DEFAULT_SPOT_CHECK_FRACTION,
    AdaptiveConfig,
    AdaptiveStatistics,
    DeltaChecker,
    OutputWatch,
    ValidationLevel,
)
from exo_stable.pipeline.recovery import FailureKind, RecoveryStatistics, ReplayMode
from exo_stable.pipeline.service import ServiceUnavailable
from exo_stable.pipeline.trace import RequestTrace
from exo_stable.wire.messages import (
    Message,
    PlanCommit,
    StageFailure,
    TokenChunk,
)

Send = Callable[[str, Message], Awaitable[None]]


class Plans(Protocol):
    """What the owner needs of the cluster's plans (the node's coordinator implements it)."""

    @property
    def active(self) -> PlanCommit | None:
        """The plan new requests run on (None before the first commit)."""
        ...

    async def wait_recoverable(
        self,
        predicate: Callable[[PlanCommit], bool],
        timeout: float,  # noqa: ASYNC109
    ) -> PlanCommit | str:
        """A committed plan satisfying ``predicate``, or why no plan fits the surviving nodes."""
        ...

    def healthy(self, plan: PlanCommit) -> bool:
        """Every stage of ``plan`` is a live member, none suspect."""
        ...

    async def mark_suspect(self, node_id: str, reason: str) -> None:
        """``node_id`` keeps failing: plans should leave it out for a while."""
        ...

    def subscribe(self, on_commit: Callable[[PlanCommit], None]) -> None:
        """Call ``on_commit`` with every plan committed from now on."""
        ...


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


@dataclass(frozen=True, slots=True)
class ValidationStatistics:
    """The owner's validation: the node's default level, what was found, and adaptive strictness."""

    default: str
    spot_check_fraction: float
    counters: ValidationCounters
    adaptive: AdaptiveStatistics

    def as_dict(self) -> dict[str, object]:
        v = self.counters
        return {
            "default": self.default,
            "spot_check_fraction": self.spot_check_fraction,
            "requests_by_level": dict(v.requests),
            "token_checksum_failures": v.token_checksum_failures,
            "tokens_rejected": v.tokens_rejected,
            "invalid_utf8_deltas": v.invalid_utf8_deltas,
            "suspicious_deltas": v.suspicious_deltas,
            "output_findings": v.output_findings,
            "adaptive": self.adaptive.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class OwnerStatistics:
    """A snapshot of the requests this node owns (``PipelineOwner.statistics()``); counters are copies."""

    active: int
    counters: OwnerStats
    replay: str
    step_deadline_s: float
    recovery: RecoveryStatistics
    validation: ValidationStatistics
    fallback: FallbackStatistics | None = None

    def as_dict(self) -> dict[str, Any]:
        """As ``/health`` shows it."""
        st = self.counters
        return {
            "active": self.active,
            "requests": st.requests,
            "finished": st.finished,
            "failed": st.failed,
            "cancelled": st.cancelled,
            "late_messages": st.late_messages,
            "resend_requests": st.resend_requests,
            "recoveries": st.recoveries,
            "fallbacks": st.fallbacks,
            "kept_plan": st.kept_plan,
            "replay": self.replay,
            "fallback": None if self.fallback is None else self.fallback.as_dict(),
            "step_deadline_s": round(self.step_deadline_s, 3),
            "recovery": self.recovery.as_dict(),
            "validation": self.validation.as_dict(),
        }


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


# Why a node cannot open a request on a plan's stage: it holds no stage of that plan (any more). Its stage
# moved on to a plan being loaded (the committed plan's stage was stopped for it) or is gone: the request
# waits for a newer plan rather than retrying the one its stages left.
NO_STAGE_LOADED = "no stage loaded"
OPEN_WITHOUT_STAGE = "request_open_without_stage"


def open_refusal_kind(failures: Mapping[str, str]) -> FailureKind:
    """The kind of a request's failed open, from what its stages answered (member: detail)."""
    moved_on = (NO_STAGE_LOADED, f"refused: {OPEN_WITHOUT_STAGE}")
    if failures and all(detail in moved_on for detail in failures.values()):
        return FailureKind.PLAN_REPLACED
    return FailureKind.BARRIER_TIMEOUT


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
