"""The request owner on the pipeline: any node can own a request and run it on the cluster's plan.

For each request the owner registers its StreamAssembler and inbox *before* the first message leaves,
announces the request to every stage of the plan and waits at the request's barrier (deadline, retries,
missing stages named), sends the prompt to stage 0 in the same chunks the single device uses, then
assembles the token chunks that come back: verified, reordered, deduplicated, decoded, with stop and
finish decided in one place. Whatever way the request ends, every stage is told to free its caches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from exo_stable.pipeline.assembler import StreamAssembler
from exo_stable.pipeline.barrier import BarrierError, Barriers
from exo_stable.recovery import FailureKind, RecoveryManager, StepDeadline
from exo_stable.service import GenerationJob, GenerationResult, ServiceUnavailable
from exo_stable.stagecompute import prompt_chunks
from exo_stable.textstream import Delta
from exo_stable.tokenizer import Tokenizer
from exo_stable.wire.messages import (
    Message,
    PlanCommit,
    RequestClose,
    RequestOpen,
    ResendTokens,
    SamplingSpec,
    StageFailure,
    StepInput,
    TokenChunk,
)

log = logging.getLogger(__name__)

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
    max_recoveries: int = 3
    recovery_timeout_s: float = 120.0


@dataclass
class _Owned:
    assembler: StreamAssembler
    plan: PlanCommit
    inbox: asyncio.Queue[TokenChunk | StageFailure]
    overflowed: bool = False


@dataclass
class OwnerStats:
    requests: int = 0
    finished: int = 0
    failed: int = 0
    late_messages: int = 0
    resend_requests: int = 0
    recoveries: int = 0


class PipelineOwner:
    """Owns requests on this node and runs them through the committed plan."""

    def __init__(
        self,
        node_id: str,
        *,
        tokenizer: Tokenizer,
        send: Send,
        plan: Callable[[], PlanCommit | None],
        barriers: Barriers,
        wait_plan: Callable[[Callable[[PlanCommit], bool], float], Awaitable[PlanCommit]],
        healthy: Callable[[PlanCommit], bool],
        config: OwnerConfig | None = None,
    ) -> None:
        self.node_id = node_id
        self.tokenizer = tokenizer
        self.send = send
        self.plan = plan
        self.wait_plan = wait_plan
        self.healthy = healthy
        self.config = config or OwnerConfig()
        self.requests: dict[str, _Owned] = {}
        self.barriers = barriers
        self.recovery = RecoveryManager()
        self.step_deadline = StepDeadline(initial_s=self.config.token_timeout_s, ceiling_s=self.config.token_timeout_s)
        self.stats = OwnerStats()
        self._ids = itertools.count()

    # -- messages from stages --------------------------------------------------------------------------

    def deliver(self, message: TokenChunk | StageFailure) -> None:
        """Route a stage's message to its request (called by the node's dispatcher; never blocks)."""
        owned = self.requests.get(message.request_id)
        if owned is None:
            self.stats.late_messages += 1  # a token run ahead of a request already closed
            return
        try:
            owned.inbox.put_nowait(message)
        except asyncio.QueueFull:
            owned.overflowed = True

    # -- one request -----------------------------------------------------------------------------------

    async def stream(self, job: GenerationJob, result: GenerationResult) -> AsyncGenerator[Delta]:
        """Yield the request's deltas, the last one carrying its finish reason.

        When the pipeline fails under the request (a stage's node goes away, a stage reports a failure, a
        token does not come within its deadline), the owner waits for a healthy plan and replays the
        request on it: the prompt in the same chunks, then every token already accepted, one decode step
        each (the same forward calls as the original run), so the stages' caches are rebuilt bit for bit
        and the stream goes on from the next position with nothing lost or repeated.
        """
        plan = self.plan()
        if plan is None:
            raise NoPlan("the cluster has no pipeline plan yet")
        rid = f"{self.node_id}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        assembler = StreamAssembler(
            rid, self.tokenizer, max_tokens=job.max_tokens, stop=job.stop, plan_epoch=plan.epoch
        )
        owned = _Owned(assembler, plan, asyncio.Queue(maxsize=self.config.inbox_size))
        self.requests[rid] = owned  # registered before anything is sent
        self.stats.requests += 1
        started = time.perf_counter()
        recoveries = 0
        try:
            while True:
                try:
                    async for delta in self._attempt(rid, job, owned, result, started):
                        yield delta
                    break
                except PipelineFailed as exc:
                    recoveries += 1
                    failed_at = time.perf_counter()
                    decision = self.recovery.classify(self.recovery.event(exc.kind, exc.node_id, (rid,), str(exc)))
                    if recoveries > self.config.max_recoveries:
                        self.recovery.outcome("failed")
                        raise
                    failed = owned.plan
                    log.warning(
                        "request %s: %s; %s failure, %s (%s); recovering (%d) from position %d",
                        rid,
                        exc,
                        decision.failure_class,
                        decision.action,
                        decision.reason,
                        recoveries,
                        assembler.next_position,
                    )
                    await self._close(rid, [s.node_id for s in failed.stages], reason="recovering")
                    try:
                        owned.plan = await self._healthy_plan(rid, failed)
                    except PipelineFailed:
                        self.recovery.outcome("failed")
                        raise
                    assembler.rebind(owned.plan.epoch)
                    _drain(owned.inbox)
                    self.stats.recoveries += 1
                    self.recovery.outcome("replayed", time.perf_counter() - failed_at)
            self.stats.finished += 1
        except BaseException:
            self.stats.failed += 1
            raise
        finally:
            del self.requests[rid]
            await self._close(rid, [s.node_id for s in owned.plan.stages])

    async def _attempt(
        self, rid: str, job: GenerationJob, owned: _Owned, result: GenerationResult, started: float
    ) -> AsyncGenerator[Delta]:
        """Run (or replay and continue) the request on ``owned.plan`` until it finishes."""
        plan, assembler = owned.plan, owned.assembler
        stage_nodes = [s.node_id for s in plan.stages]
        history = assembler.token_ids
        await self._open(rid, job, plan, job.max_tokens, history)
        chunks = prompt_chunks(job.prompt_ids)
        for step, chunk in enumerate(chunks):
            await self.send(
                stage_nodes[0],
                StepInput(
                    request_id=rid,
                    plan_epoch=plan.epoch,
                    step=step,
                    position=0,
                    tokens=tuple(chunk),
                    final=step == len(chunks) - 1,
                ),
            )
        # A replay recomputes the history before the next new token: allow for it in the first deadline.
        deadline = self.config.first_token_timeout_s + self.config.token_timeout_s * len(history)
        while not assembler.finished:
            if assembler.next_position >= job.max_tokens:
                delta = assembler.finish_length()
                result.finish_reason = delta.finish_reason
                yield delta
                return
            waited = time.perf_counter()
            message = await self._next(owned, deadline, rid)
            if assembler.next_position > len(history):
                self.step_deadline.observe(time.perf_counter() - waited)
            deadline = self.step_deadline.deadline()
            if isinstance(message, StageFailure):
                raise PipelineFailed(
                    f"stage {message.node_id} failed request {rid}: {message.detail}",
                    kind=_failure_kind(message.detail),
                    node_id=message.node_id,
                )
            step_result = assembler.accept(message)
            if result.first_token_s is None and assembler.next_position > 0:
                result.first_token_s = time.perf_counter() - started
            result.token_ids = list(assembler.token_ids)
            result.completion_tokens = len(result.token_ids)
            if step_result.missing:
                self.stats.resend_requests += 1
                await self.send(stage_nodes[-1], ResendTokens(request_id=rid, positions=step_result.missing))
            for delta in step_result.deltas:
                if delta.finish_reason is not None:
                    result.finish_reason = delta.finish_reason
                yield delta

    async def _healthy_plan(self, rid: str, failed: PlanCommit) -> PlanCommit:
        """A committed plan whose every stage is a live member (a new one if ``failed`` lost a node)."""
        try:
            return await self.wait_plan(self.healthy, self.config.recovery_timeout_s)
        except TimeoutError as exc:
            raise PipelineFailed(
                f"request {rid}: no healthy plan within {self.config.recovery_timeout_s:.0f}s after plan "
                f"{failed.epoch} failed"
            ) from exc

    def on_plan_committed(self, plan: PlanCommit) -> None:
        """A new plan replaced the stages under older requests (their caches went with the old stage
        actors wherever a node's layers changed): move them to it now, by replay, rather than at a deadline."""
        for rid, owned in self.requests.items():
            if owned.plan.epoch < plan.epoch and _stages_changed(owned.plan, plan):
                failure = StageFailure(request_id=rid, node_id=plan.leader, detail=f"plan {plan.epoch} replaced it")
                try:
                    owned.inbox.put_nowait(failure)
                except asyncio.QueueFull:
                    owned.overflowed = True

    def on_peer_down(self, node_id: str) -> None:
        """A node went away: every request whose plan uses it fails now (and recovers), not at a deadline."""
        for rid, owned in self.requests.items():
            if any(s.node_id == node_id for s in owned.plan.stages):
                failure = StageFailure(request_id=rid, node_id=node_id, detail=f"node {node_id} is down")
                try:
                    owned.inbox.put_nowait(failure)
                except asyncio.QueueFull:
                    owned.overflowed = True

    async def _next(self, owned: _Owned, timeout: float, rid: str) -> TokenChunk | StageFailure:  # noqa: ASYNC109
        if owned.overflowed:
            raise PipelineFailed(
                f"request {rid}: more than {self.config.inbox_size} chunks waiting", node_id=self.node_id
            )
        try:
            async with asyncio.timeout(timeout):
                return await owned.inbox.get()
        except TimeoutError as exc:
            missing = owned.assembler.next_position
            raise PipelineFailed(
                f"request {rid}: no token at position {missing} within {timeout:.1f}s",
                kind=FailureKind.STEP_DEADLINE,
                node_id=owned.plan.stages[-1].node_id,
            ) from exc

    async def _open(
        self, rid: str, job: GenerationJob, plan: PlanCommit, budget: int, history: tuple[int, ...] = ()
    ) -> None:
        p = job.params
        name = f"open/{rid}"
        message = RequestOpen(
            request_id=rid,
            owner=self.node_id,
            plan_epoch=plan.epoch,
            sampling=SamplingSpec(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed),
            max_tokens=budget,
            prompt_tokens=len(job.prompt_ids),
            barrier=name,
            history=history,
        )

        async def resend(missing: frozenset[str], attempt: int) -> None:
            log.warning("request %s: attempt %d, stages not ready: %s", rid, attempt, sorted(missing))
            for node in sorted(missing):
                await self.send(node, message)

        members = frozenset(s.node_id for s in plan.stages)
        async with self.barriers.opened(name, members, resend) as barrier:
            for stage in plan.stages:
                await self.send(stage.node_id, message)
            try:
                await barrier.sync_with_timeout(self.config.open_timeout_s, self.config.open_retries)
            except BarrierError as exc:
                missing = ",".join(sorted(exc.missing))
                raise PipelineFailed(
                    f"request {rid} could not start: {exc}", kind=FailureKind.BARRIER_TIMEOUT, node_id=missing
                ) from exc

    async def _close(self, rid: str, nodes: list[str], reason: str = "finished") -> None:
        for node in nodes:
            try:
                await self.send(node, RequestClose(request_id=rid, reason=reason))
            except (ConnectionError, TimeoutError) as exc:
                # The stage is gone or unreachable: its caches went with it, or its link will deliver later.
                log.warning("request %s: could not tell %s to close: %r", rid, node, exc)

    def snapshot(self) -> dict[str, Any]:
        return {
            "active": len(self.requests),
            "requests": self.stats.requests,
            "finished": self.stats.finished,
            "failed": self.stats.failed,
            "late_messages": self.stats.late_messages,
            "resend_requests": self.stats.resend_requests,
            "recoveries": self.stats.recoveries,
            "step_deadline_s": round(self.step_deadline.deadline(), 3),
            "recovery": self.recovery.snapshot(),
        }


def _drain(queue: asyncio.Queue[TokenChunk | StageFailure]) -> None:
    """Drop what the failed attempt left behind (stale epochs would be rejected anyway)."""
    while not queue.empty():
        queue.get_nowait()


def _stages_changed(old: PlanCommit, new: PlanCommit) -> bool:
    """Whether any node of ``old`` holds different layers (or none) in ``new``."""
    now = {s.node_id: (s.start, s.end) for s in new.stages}
    return any(now.get(s.node_id) != (s.start, s.end) for s in old.stages)


def _failure_kind(detail: str) -> FailureKind:
    """The kind of a stage's reported failure (node-down notices come from this node's own membership)."""
    if detail.startswith("node ") and detail.endswith(" is down"):
        return FailureKind.NODE_LOST
    if detail.startswith("plan "):
        return FailureKind.PLAN_REPLACED
    if detail.startswith("bad activation"):
        return FailureKind.CHECKSUM
    return FailureKind.STAGE_FAILURE
