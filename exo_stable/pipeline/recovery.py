"""Failure events, their classification, and deadlines derived from measured step times. Pure logic.

Every failure a request owner sees becomes a typed :class:`FailureEvent` (what, which node, which requests,
the evidence). The :class:`RecoveryManager` classifies it (the seed's three classes) and picks the cheapest
mechanism that can work:

- **transient**: a lost or corrupted frame, one slow step, a first stage crash: retransmit, regenerate, or
  replay the request on the same plan;
- **persistent**: a node gone, or a node failing again and again within the window: re-plan over the
  survivors and replay;
- **catastrophic**: no plan fits the surviving nodes: fall back to one device that holds the whole model,
  or fail the request with a clear error.

"Again and again" adapts to what is normal: the repeat threshold rises with the failure rate observed over
a longer window, so a flaky-but-working network is not treated like a dying node. Step deadlines come from
measured step times (:class:`StepDeadline`), never from a constant alone.
"""

from __future__ import annotations

import enum
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from exo_stable.wire.messages import RecoveryAction


class FailureKind(enum.StrEnum):
    NODE_LOST = "node_lost"  # its links closed or its heartbeats stopped
    STEP_DEADLINE = "step_deadline"  # a token did not come within its deadline
    CHECKSUM = "checksum"  # a token or tensor failed its end-to-end checksum
    BARRIER_TIMEOUT = "barrier_timeout"  # a stage never answered a request's (or a plan's) barrier
    STAGE_FAILURE = "stage_failure"  # a stage reported it could not run a step (crash, bad input)
    PLAN_REPLACED = "plan_replaced"  # a new plan took the stages away from under the request
    NO_PLAN = "no_plan"  # no plan fits the surviving nodes
    STAGE_ESCALATED = "stage_escalated"  # a stage crashed past its supervisor's restart intensity
    SPOT_CHECK = "spot_check"  # a strict request's step, computed twice on its stage, gave two different results


class ReplayMode(enum.StrEnum):
    """How a request's caches are rebuilt on a new (or restarted) pipeline.

    ``exact``: the prompt in its chunks, then every generated token one decode step each: the same forward
    calls as the original run, so the rest of the answer is bit-identical to an uninterrupted run.
    ``fast``: prompt and generated tokens in one batched re-prefill (chunked like any prompt): fewer forward
    calls, but batched arithmetic may round differently, so the continuation may differ from an
    uninterrupted run (never the text already sent).
    """

    EXACT = "exact"
    FAST = "fast"


class FailureClass(enum.StrEnum):
    TRANSIENT = "transient"
    PERSISTENT = "persistent"
    CATASTROPHIC = "catastrophic"


@dataclass(frozen=True, slots=True)
class FailureEvent:
    kind: FailureKind
    node_id: str
    request_ids: tuple[str, ...]
    evidence: str
    at: float


@dataclass(frozen=True, slots=True)
class Decision:
    failure_class: FailureClass
    action: RecoveryAction
    replan: bool  # wait for a plan without the node (True) or retry on the plan in force
    reason: str

    @property
    def mechanism(self) -> str:
        """The mechanism this decision picks, cheapest first: retransmit, regenerate, replay, replan, fallback."""
        match self.action:
            case RecoveryAction.FALLBACK_SINGLE_DEVICE:
                return "fallback"
            case RecoveryAction.RESTART_PIPELINE:
                return "replan" if self.replan else "replay"
            case _:
                return self.action.value


@dataclass
class RecoveryThresholds:
    window_s: float = 60.0  # repeats within this window count towards "persistent"
    base_repeats: int = 3  # this many failures of one node within the window make it persistent
    long_window_s: float = 600.0  # the background failure rate is measured over this window
    max_repeats: int = 12


@dataclass
class RecoveryStats:
    events: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    mechanisms: Counter[str] = field(default_factory=Counter)
    resume_s: deque[float] = field(default_factory=lambda: deque(maxlen=1024))
    resume_by_mode: dict[str, deque[float]] = field(default_factory=dict)
    replan_s: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


@dataclass(frozen=True, slots=True)
class RecoveryStatistics:
    """A snapshot of the recovery manager: events, classes, mechanisms and outcomes by name, and the
    recent times to resume (per replay mode) and to find a new plan."""

    events: Mapping[str, int]
    classes: Mapping[str, int]
    outcomes: Mapping[str, int]
    mechanisms: Mapping[str, int]
    resume_s: tuple[float, ...] = ()
    resume_by_mode: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    replan_s: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, object]:
        """As ``/health`` shows it: the counters and the times' quantiles."""
        return {
            "events": dict(self.events),
            "classes": dict(self.classes),
            "outcomes": dict(self.outcomes),
            "mechanisms": dict(self.mechanisms),
            "resume_p50_s": _quantile(sorted(self.resume_s), 0.5),
            "resume_p99_s": _quantile(sorted(self.resume_s), 0.99),
            "replan_p50_s": _quantile(sorted(self.replan_s), 0.5),
            "resume_by_mode": {
                mode: {"n": len(v), "p50_s": _quantile(sorted(v), 0.5), "p99_s": _quantile(sorted(v), 0.99)}
                for mode, v in self.resume_by_mode.items()
            },
        }


class RecoveryManager:
    """Failure events in → classification → mechanism; outcomes and times to resume out (for /health)."""

    def __init__(self, thresholds: RecoveryThresholds | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.thresholds = thresholds or RecoveryThresholds()
        self.clock = clock
        self._history: deque[FailureEvent] = deque(maxlen=4096)
        self.stats = RecoveryStats()

    def event(self, kind: FailureKind, node_id: str, request_ids: tuple[str, ...], evidence: str) -> FailureEvent:
        return FailureEvent(kind, node_id, request_ids, evidence, self.clock())

    def repeat_threshold(self, now: float) -> int:
        """Failures of one node within ``window_s`` that make it persistent; rises with the background rate."""
        t = self.thresholds
        recent = sum(1 for e in self._history if now - e.at <= t.long_window_s)
        per_window = recent * t.window_s / t.long_window_s
        return min(t.max_repeats, t.base_repeats + math.floor(per_window))

    def classify(self, event: FailureEvent) -> Decision:
        """Record ``event`` and decide what to do about it."""
        now = event.at
        threshold = self.repeat_threshold(now)
        self._history.append(event)
        self.stats.events[event.kind.value] += 1
        same_node = sum(
            1 for e in self._history if e.node_id == event.node_id and now - e.at <= self.thresholds.window_s
        )
        match event.kind:
            case FailureKind.NO_PLAN:
                decision = Decision(
                    FailureClass.CATASTROPHIC,
                    RecoveryAction.FALLBACK_SINGLE_DEVICE,
                    True,
                    "no plan fits the surviving nodes",
                )
            case FailureKind.STAGE_ESCALATED:
                decision = Decision(
                    FailureClass.PERSISTENT,
                    RecoveryAction.RESTART_PIPELINE,
                    True,
                    f"the stage supervisor of {event.node_id} gave up",
                )
            case FailureKind.NODE_LOST:
                decision = Decision(
                    FailureClass.PERSISTENT, RecoveryAction.RESTART_PIPELINE, True, f"node {event.node_id} is gone"
                )
            case FailureKind.PLAN_REPLACED:
                decision = Decision(
                    FailureClass.TRANSIENT, RecoveryAction.RESTART_PIPELINE, True, "the request moves to the new plan"
                )
            case FailureKind.CHECKSUM | FailureKind.SPOT_CHECK if same_node < threshold:
                decision = Decision(FailureClass.TRANSIENT, RecoveryAction.REGENERATE, False, "ask for the token again")
            case _ if same_node >= threshold:
                decision = Decision(
                    FailureClass.PERSISTENT,
                    RecoveryAction.RESTART_PIPELINE,
                    True,
                    f"{same_node} failures of {event.node_id} within {self.thresholds.window_s:.0f}s "
                    f"(threshold {threshold})",
                )
            case _:
                decision = Decision(
                    FailureClass.TRANSIENT, RecoveryAction.RESTART_PIPELINE, False, "replay on the plan in force"
                )
        self.stats.classes[decision.failure_class.value] += 1
        self.stats.mechanisms[decision.mechanism] += 1
        return decision

    def suspects(self, now: float | None = None) -> frozenset[str]:
        """Nodes failing persistently right now (a planner can leave them out)."""
        now = self.clock() if now is None else now
        threshold = self.repeat_threshold(now)
        counts = Counter(e.node_id for e in self._history if now - e.at <= self.thresholds.window_s)
        return frozenset(node for node, n in counts.items() if n >= threshold)

    def outcome(self, outcome: str, resume_s: float | None = None, *, mode: str | None = None) -> None:
        """Record how a recovery ended (``resumed``, ``fallback``, ``failed``) and how long the stream
        paused: the failure seen → the next new token accepted (``resume_s``), per replay ``mode``."""
        self.stats.outcomes[outcome] += 1
        if resume_s is not None:
            self.stats.resume_s.append(resume_s)
            if mode is not None:
                self.stats.resume_by_mode.setdefault(mode, deque(maxlen=1024)).append(resume_s)

    def replanned(self, seconds: float) -> None:
        """A failed request found a healthy plan ``seconds`` after its failure (before its replay)."""
        self.stats.replan_s.append(seconds)

    def statistics(self) -> RecoveryStatistics:
        st = self.stats
        return RecoveryStatistics(
            events=dict(st.events),
            classes=dict(st.classes),
            outcomes=dict(st.outcomes),
            mechanisms=dict(st.mechanisms),
            resume_s=tuple(st.resume_s),
            resume_by_mode={mode: tuple(v) for mode, v in st.resume_by_mode.items()},
            replan_s=tuple(st.replan_s),
        )

    def snapshot(self) -> dict[str, object]:
        return self.statistics().as_dict()


class StepDeadline:
    """How long to wait for the next token, from the step times measured so far.

    ``deadline = clamp(mean + k * deviation, floor, ceiling)`` over an exponentially weighted mean and mean
    absolute deviation of observed inter-token times; until ``warmup`` steps are seen, ``initial_s``.
    A slow-but-alive stage stretches its own deadline gradually; one that stops outright is caught after a
    few of its usual step times, not after a fixed minute.
    """

    def __init__(
        self,
        *,
        initial_s: float = 60.0,
        floor_s: float = 10.0,
        ceiling_s: float = 120.0,
        k: float = 8.0,
        alpha: float = 0.1,
        warmup: int = 8,
    ) -> None:
        self.initial_s = initial_s
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self.k = k
        self.alpha = alpha
        self.warmup = warmup
        self.samples = 0
        self.mean = 0.0
        self.deviation = 0.0

    def observe(self, step_s: float) -> None:
        if step_s < 0:
            raise ValueError("a step cannot take negative time")
        self.samples += 1
        if self.samples == 1:
            self.mean, self.deviation = step_s, step_s / 2
            return
        error = step_s - self.mean
        self.mean += self.alpha * error
        self.deviation += self.alpha * (abs(error) - self.deviation)

    def deadline(self) -> float:
        if self.samples < self.warmup:
            return self.initial_s
        return min(self.ceiling_s, max(self.floor_s, self.mean + self.k * self.deviation + 4 * self.mean))


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return round(values[index], 4)
