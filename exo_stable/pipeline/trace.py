"""Per-request traces: which node computed which layers at each step, how long, what went over the wire.

Pure data, no IO. The API opens a :class:`RequestTrace` for each request and keeps it in a bounded
:class:`TraceRing` (``GET /v1/traces/{id}``). The backend fills it in while the request runs:

- on a pipeline, every stage reports each forward step it ran as a :class:`~exo_stable.wire.messages.StepHop`
  carried forward with the activations and delivered to the owner with the token (the last stage holds the
  hops of steps that yield no token, prompt chunks and replayed positions, until the next token leaves);
- on the single device, each decode step is one record over all layers.

Recoveries, re-asked positions and the link counters moved while the request ran are events beside the
steps. A trace keeps at most ``max_steps`` step records (the earliest) and counts the rest; its per-node
totals always cover every step.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from exo_stable.wire.messages import StageRange, StepHop

__all__ = [
    "NodeTotals",
    "RequestTrace",
    "StepRecord",
    "TraceEvent",
    "TraceRing",
    "decode_breakdown",
    "token_spans",
]

DEFAULT_RING = 128
DEFAULT_MAX_STEPS = 2048
MAX_EVENTS = 256


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One forward step of one stage (or of the whole model on the single device)."""

    step: int
    position: int
    node_id: str
    stage: int
    layers: tuple[int, int]  # [start, end)
    tokens: int  # tokens that went through the layers in this step
    stage_s: float  # time the stage spent on the step (waiting for its compute thread included)
    bytes_out: int  # activation bytes sent on to the next stage (0 for the last stage)
    checksum: str  # CRC32 of what left the stage: the activation tensor, or the sealed token
    attempt: int  # 0, then 1, 2... after each recovery
    at_s: float  # when the owner learned of it, from the trace's start
    received_at: float = 0.0  # wall clock when the stage took the step in (0: not reported)
    compute_s: float = 0.0  # of stage_s, the forward call on the stage's compute thread
    batch: int = 1  # requests whose steps shared the forward call (the stage's continuous batching)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "position": self.position,
            "node_id": self.node_id,
            "stage": self.stage,
            "layers": list(self.layers),
            "tokens": self.tokens,
            "stage_ms": round(1000 * self.stage_s, 3),
            "compute_ms": round(1000 * self.compute_s, 3),
            "batch": self.batch,
            "received_at": round(self.received_at, 6),
            "bytes_out": self.bytes_out,
            "checksum": self.checksum,
            "attempt": self.attempt,
            "at_s": round(self.at_s, 4),
        }


@dataclass(frozen=True, slots=True)
class TraceEvent:
    kind: str  # "plan", "recovery", "resend", "links"
    at_s: float
    detail: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at_s": round(self.at_s, 4), **self.detail}


@dataclass(slots=True)
class NodeTotals:
    """Every step one node ran for the request, summed (kept even past ``max_steps``)."""

    layers: set[tuple[int, int]] = field(default_factory=set)
    steps: int = 0
    tokens: int = 0
    stage_s: float = 0.0
    compute_s: float = 0.0
    bytes_out: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": [list(r) for r in sorted(self.layers)],
            "steps": self.steps,
            "tokens": self.tokens,
            "stage_ms": round(1000 * self.stage_s, 3),
            "compute_ms": round(1000 * self.compute_s, 3),
            "bytes_out": self.bytes_out,
        }


class RequestTrace:
    """The trace of one request (see the module docstring)."""

    def __init__(
        self,
        request_id: str,
        *,
        backend: str,
        prompt_tokens: int,
        max_steps: int = DEFAULT_MAX_STEPS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.request_id = request_id
        self.backend = backend
        self.prompt_tokens = prompt_tokens
        self.max_steps = max_steps
        self.created = time.time()
        self._clock = clock
        self._t0 = clock()
        self.steps: list[StepRecord] = []
        self.steps_dropped = 0
        self.hops_lost = 0
        self.events: list[TraceEvent] = []
        self.events_dropped = 0
        self.nodes: dict[str, NodeTotals] = {}
        self.attempt = 0
        self.recoveries = 0
        self.resend_requests = 0
        self.first_token_s: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.ended_s: float | None = None
        self.validation: str | None = None  # the level the request ran at (pipeline only)
        self.replay: str | None = None  # the replay mode a recovery would use (pipeline only)

    def now(self) -> float:
        return self._clock() - self._t0

    # -- recording -------------------------------------------------------------------------------------

    def step(self, record: StepRecord) -> None:
        totals = self.nodes.setdefault(record.node_id, NodeTotals())
        totals.layers.add(record.layers)
        totals.steps += 1
        totals.tokens += record.tokens
        totals.stage_s += record.stage_s
        totals.compute_s += record.compute_s
        totals.bytes_out += record.bytes_out
        if len(self.steps) < self.max_steps:
            self.steps.append(record)
        else:
            self.steps_dropped += 1

    def hops(self, hops: Iterable[StepHop], *, lost: int = 0) -> None:
        """Steps reported by the stages (with a token); ``lost``: hops a stage could not keep for it."""
        at = self.now()
        for h in hops:
            self.step(
                StepRecord(
                    step=h.step,
                    position=h.position,
                    node_id=h.node_id,
                    stage=h.stage,
                    layers=(h.start, h.end),
                    tokens=h.tokens,
                    stage_s=h.stage_s,
                    bytes_out=h.bytes_out,
                    checksum=h.checksum,
                    attempt=self.attempt,
                    at_s=at,
                    received_at=h.received_at,
                    compute_s=h.compute_s,
                    batch=h.batch,
                )
            )
        self.hops_lost += lost

    def event(self, kind: str, **detail: Any) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append(TraceEvent(kind, self.now(), detail))
        else:
            self.events_dropped += 1

    def plan(self, epoch: int, stages: Iterable[StageRange]) -> None:
        self.event("plan", epoch=epoch, stages=[{"node_id": s.node_id, "layers": [s.start, s.end]} for s in stages])

    def recovery(self, **detail: Any) -> None:
        """A failure under the request; the steps after it belong to the next attempt."""
        self.recoveries += 1
        self.attempt += 1
        self.event("recovery", **detail)

    def resend(self, positions: Iterable[int]) -> None:
        self.resend_requests += 1
        self.event("resend", positions=list(positions))

    def tokens(self, completion_tokens: int, first_token_s: float | None) -> None:
        self.completion_tokens = completion_tokens
        if self.first_token_s is None:
            self.first_token_s = first_token_s

    def end(self, finish_reason: str | None) -> None:
        self.finish_reason = finish_reason
        self.ended_s = self.now()

    # -- reading ---------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The compact form (a response's ``exo_trace``): per node totals, recoveries, retransmissions."""
        links = [e.detail for e in self.events if e.kind == "links"]
        return {
            "id": self.request_id,
            "backend": self.backend,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "first_token_ms": None if self.first_token_s is None else round(1000 * self.first_token_s, 3),
            "finish_reason": self.finish_reason,
            "nodes": {node: totals.as_dict() for node, totals in self.nodes.items()},
            "steps": sum(t.steps for t in self.nodes.values()),
            "recoveries": self.recoveries,
            "resend_requests": self.resend_requests,
            "link_retransmits": sum(int(d.get("retransmits", 0)) for d in links),
            "link_corrupt_frames": sum(int(d.get("corrupt_frames", 0)) for d in links),
            "validation": self.validation,
            "replay": self.replay,
            "spans": token_spans(self.steps, self.events),
        }

    def live(self) -> dict[str, Any]:
        """The summary and every event, without the step records: small enough to poll while a request runs."""
        return {**self.summary(), "steps_dropped": self.steps_dropped, "events": [e.as_dict() for e in self.events]}

    def as_dict(self) -> dict[str, Any]:
        """Everything: the summary, every kept step record and every event."""
        return {
            **self.summary(),
            "object": "exo.trace",
            "created": int(self.created),
            "duration_ms": None if self.ended_s is None else round(1000 * self.ended_s, 3),
            "steps_kept": len(self.steps),
            "steps_dropped": self.steps_dropped,
            "hops_lost": self.hops_lost,
            "events_dropped": self.events_dropped,
            "step_records": [s.as_dict() for s in self.steps],
            "events": [e.as_dict() for e in self.events],
        }


class TraceRing:
    """The last ``capacity`` traces by request id; the oldest goes when a new one comes."""

    def __init__(self, capacity: int = DEFAULT_RING, *, max_steps: int = DEFAULT_MAX_STEPS) -> None:
        if capacity < 1:
            raise ValueError("a trace ring holds at least one trace")
        self.capacity = capacity
        self.max_steps = max_steps
        self._traces: OrderedDict[str, RequestTrace] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._traces)

    def open(self, request_id: str, *, backend: str, prompt_tokens: int) -> RequestTrace:
        trace = RequestTrace(request_id, backend=backend, prompt_tokens=prompt_tokens, max_steps=self.max_steps)
        self._traces[request_id] = trace
        self._traces.move_to_end(request_id)
        while len(self._traces) > self.capacity:
            self._traces.popitem(last=False)
            self.evicted += 1
        return trace

    def get(self, request_id: str) -> RequestTrace | None:
        return self._traces.get(request_id)


def token_spans(steps: Iterable[StepRecord], events: Iterable[TraceEvent]) -> list[dict[str, Any]]:
    """Which nodes computed which completion tokens: one span per attempt (the first run, then one after each
    recovery), in order.

    A step at ``position`` p yields completion token p (the prompt's last chunk yields token 0). After the k-th
    recovery (``from_position`` f), the attempt's steps below f rebuild the caches (``replayed_tokens``) and
    its new tokens start at f. ``stages``: every (stage, node, layers) that reported a step in the attempt;
    ``resumed_after_ms``: from the failure to the owner receiving the attempt's first new token.
    """
    recoveries = [e for e in events if e.kind == "recovery"]
    plans = [e for e in events if e.kind == "plan"]
    spans: dict[int, dict[str, Any]] = {}
    replayed: dict[int, set[int]] = {}
    for r in steps:
        start = int(recoveries[r.attempt - 1].detail.get("from_position", 0)) if 0 < r.attempt <= len(recoveries) else 0
        span = spans.setdefault(
            r.attempt,
            {"attempt": r.attempt, "from_token": None, "to_token": None, "stages": {}, "first_new_at_s": None},
        )
        span["stages"][(r.stage, r.node_id)] = r.layers
        if r.position < start:
            replayed.setdefault(r.attempt, set()).add(r.position)
            continue
        span["from_token"] = r.position if span["from_token"] is None else min(span["from_token"], r.position)
        span["to_token"] = r.position if span["to_token"] is None else max(span["to_token"], r.position)
        if span["first_new_at_s"] is None:
            span["first_new_at_s"] = r.at_s
    out = []
    for attempt in sorted(spans):
        span = spans[attempt]
        first_new = span.pop("first_new_at_s")
        span["stages"] = [
            {"stage": stage, "node_id": node, "layers": list(layers)}
            for (stage, node), layers in sorted(span["stages"].items())
        ]
        span["plan_epoch"] = plans[attempt].detail.get("epoch") if attempt < len(plans) else None
        span["replayed_tokens"] = len(replayed.get(attempt, ()))
        if 0 < attempt <= len(recoveries):
            failure = recoveries[attempt - 1]
            span["recovery"] = failure.as_dict()
            span["resumed_after_ms"] = None if first_new is None else round(1000 * (first_new - failure.at_s), 1)
        out.append(span)
    return out


def decode_breakdown(step_records: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Where a pipeline's decode steps spent their time, from a trace's ``step_records`` (medians, in ms).

    Per stage: ``compute_ms`` (the forward call on its compute thread) and ``handoff_ms`` (the rest of the
    stage's time: to and from that thread, packing the result, queueing the sends). Per hop: ``wire_ms`` from
    one stage sending to the next taking the step in, the last hop being the token going round to stage 0.
    ``step_ms`` is stage 0 taking one step in to taking the next. Only one-token steps of the first attempt
    whose every stage reported count. The hops compare wall clocks of different nodes: exact on one host,
    off by the clocks' offset across hosts. ``None`` when fewer than two such steps are known.
    """
    by_step: dict[int, dict[int, Mapping[str, Any]]] = {}
    for r in step_records:
        if r.get("attempt", 0) == 0 and r.get("tokens") == 1 and r.get("received_at", 0) > 0:
            by_step.setdefault(int(r["step"]), {})[int(r["stage"])] = r
    if not by_step:
        return None
    n_stages = max(len(stages) for stages in by_step.values())
    full = {s: stages for s, stages in by_step.items() if sorted(stages) == list(range(n_stages))}
    steps = sorted(s for s in full if s + 1 in full)
    if len(steps) < 2:
        return None

    def leaves(r: Mapping[str, Any]) -> float:
        return float(r["received_at"]) + float(r["stage_ms"]) / 1000

    compute = [[float(full[s][k]["compute_ms"]) for s in steps] for k in range(n_stages)]
    handoff = [
        [float(full[s][k]["stage_ms"]) - float(full[s][k]["compute_ms"]) for s in steps] for k in range(n_stages)
    ]
    wire = [
        [1000 * (float(full[s][k + 1]["received_at"]) - leaves(full[s][k])) for s in steps] for k in range(n_stages - 1)
    ]
    wire.append([1000 * (float(full[s + 1][0]["received_at"]) - leaves(full[s][n_stages - 1])) for s in steps])
    step_ms = [1000 * (float(full[s + 1][0]["received_at"]) - float(full[s][0]["received_at"])) for s in steps]
    return {
        "steps": len(steps),
        "step_ms": _median(step_ms),
        "stages": [
            {"stage": k, "compute_ms": _median(compute[k]), "handoff_ms": _median(handoff[k])} for k in range(n_stages)
        ],
        "wire_ms": [_median(w) for w in wire],
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    value = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return round(value, 3)
