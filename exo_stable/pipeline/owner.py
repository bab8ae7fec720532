"""The request owner on the pipeline: any node can own a request and run it on the cluster's plan.

For each request the owner registers its StreamAssembler and inbox *before* the first message leaves,
announces the request to every stage of the plan and waits at the request's barrier (deadline, retries,
missing stages named), sends the prompt to stage 0 in the same chunks the single device uses, then
assembles the token chunks that come back: verified, reordered, deduplicated, decoded, with stop and
finish decided in one place. Whatever way the request ends, every stage is told to free its caches.

Its settings, per-request state, counters, errors and the pure rules it applies to failures are in
:mod:`exo_stable.pipeline.ownerstate`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from exo_stable.engine.mlx_thread import WorkerClosed, WorkerTimeout
from exo_stable.engine.stagecompute import prompt_chunks
from exo_stable.engine.textstream import Delta
from exo_stable.pipeline.assembler import AssemblyStep, StreamAssembler
from exo_stable.pipeline.barrier import BarrierError, Barriers
from exo_stable.pipeline.fallback import FallbackCoordinator, FallbackUnavailable
from exo_stable.pipeline.levels import (
    AdaptiveStrictness,
    DeltaChecker,
    IntegrityCounters,
    OutputWatch,
    ValidationLevel,
)
from exo_stable.pipeline.ownerstate import (
    SUSPECT_KINDS,
    CorruptOutput,
    NoPlan,
    Owned,
    OwnerConfig,
    OwnerStatistics,
    OwnerStats,
    PipelineFailed,
    Plans,
    Send,
    ValidationCounters,
    ValidationStatistics,
    drain,
    failure_kind,
    open_refusal_kind,
    trace_token,
)
from exo_stable.pipeline.recovery import FailureClass, FailureKind, RecoveryManager, ReplayMode, StepDeadline
from exo_stable.pipeline.sampling import params_to_wire
from exo_stable.pipeline.service import GenerationJob
from exo_stable.pipeline.trace import RequestTrace
from exo_stable.tokenizer import Tokenizer
from exo_stable.wire.messages import (
    PlanCommit,
    RequestClose,
    RequestOpen,
    ResendTokens,
    StageFailure,
    StepInput,
    TokenChunk,
    ValidationError,
)
from exo_stable.wire.validation import TokenTransferValidator

log = logging.getLogger(__name__)


class PipelineOwner:
    """Owns requests on this node and runs them through the committed plan."""

    def __init__(
        self,
        node_id: str,
        *,
        tokenizer: Tokenizer,
        send: Send,
        plans: Plans,
        barriers: Barriers,
        config: OwnerConfig | None = None,
        fallback: FallbackCoordinator | None = None,
        link_integrity: Callable[[], IntegrityCounters] | None = None,
    ) -> None:
        """``plans``: the committed plans (the node's coordinator); ``link_integrity``: the corrupt frames and
        retransmits of this node's links, which adaptive strictness adds to the owner's own findings."""
        self.node_id = node_id
        self.tokenizer = tokenizer
        self.send = send
        self.plans = plans
        self.config = config or OwnerConfig()
        self.fallback = fallback
        self.link_integrity = link_integrity
        self.requests: dict[str, Owned] = {}
        self.barriers = barriers
        self.recovery = RecoveryManager()
        self.step_deadline = StepDeadline(initial_s=self.config.token_timeout_s, ceiling_s=self.config.token_timeout_s)
        self.stats = OwnerStats()
        self._ids = itertools.count()
        self.validation = ValidationCounters(requests={level.value: 0 for level in ValidationLevel})
        self.adaptive = AdaptiveStrictness(self.config.validation, self.config.adaptive, clock=time.monotonic)
        plans.subscribe(self.on_plan_committed)

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

    async def stream(self, job: GenerationJob, trace: RequestTrace | None = None) -> AsyncGenerator[Delta]:
        """Yield the request's deltas, the last one carrying its finish reason (its plan, recoveries, tokens'
        hops and findings go into ``trace`` when the caller keeps one).

        When the pipeline fails under the request (a stage's node goes away, a stage reports a failure, a
        token does not come within its deadline), the owner waits for a healthy plan and replays the
        request on it: the prompt in the same chunks, then every token already accepted, one decode step
        each (the same forward calls as the original run), so the stages' caches are rebuilt bit for bit
        and the stream goes on from the next position with nothing lost or repeated.
        """
        plan = self.plans.active
        if plan is None:
            raise NoPlan("the cluster has no pipeline plan yet")
        rid = f"{self.node_id}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        level = self.level_for(job.validation)
        assembler = StreamAssembler(
            rid,
            self.tokenizer,
            max_tokens=job.max_tokens,
            stop=job.stop,
            plan_epoch=plan.epoch,
            verify_checksum=level is not ValidationLevel.OFF,
        )
        mode = job.replay or self.config.replay
        if trace is not None:
            trace.validation, trace.replay = level.value, mode.value
        owned = Owned(
            assembler,
            plan,
            asyncio.Queue(maxsize=self.config.inbox_size),
            mode=mode,
            level=level,
            deltas=DeltaChecker(level),
            output=OutputWatch(level),
            trace=trace,
        )
        self.requests[rid] = owned  # registered before anything is sent
        self.stats.requests += 1
        started = time.perf_counter()
        recoveries = 0
        try:
            while True:
                try:
                    attempt = (
                        self._fallback_attempt(rid, job, owned, started)
                        if owned.on_fallback
                        else self._attempt(rid, job, owned, started)
                    )
                    async with aclosing(attempt) as deltas:
                        async for delta in deltas:
                            yield delta
                    break
                except PipelineFailed as exc:
                    recoveries += 1
                    owned.failed_at = time.perf_counter()
                    decision = self.recovery.classify(self.recovery.event(exc.kind, exc.node_id, (rid,), str(exc)))
                    if trace is not None:
                        trace.recovery(
                            failure=exc.kind.value,
                            node_id=exc.node_id,
                            failure_class=decision.failure_class.value,
                            mechanism=decision.mechanism,
                            from_position=assembler.next_position,
                            detail=str(exc),
                        )
                    if recoveries > self.config.max_recoveries or owned.on_fallback:
                        self.recovery.outcome("failed")
                        raise
                    failed = owned.plan
                    log.warning(
                        "request %s: %s; %s failure, %s (%s); recovering (%d) from position %d by %s replay",
                        rid,
                        exc,
                        decision.failure_class,
                        decision.mechanism,
                        decision.reason,
                        recoveries,
                        assembler.next_position,
                        mode,
                    )
                    await self._close(rid, [s.node_id for s in failed.stages], reason="recovering")
                    if (
                        decision.failure_class is FailureClass.PERSISTENT
                        and exc.kind in SUSPECT_KINDS
                        and any(s.node_id == exc.node_id for s in failed.stages)
                    ):
                        await self.plans.mark_suspect(exc.node_id, decision.reason)
                    try:
                        found = await self._healthy_plan(rid, failed, newer=exc.kind is FailureKind.PLAN_REPLACED)
                        if isinstance(found, str):
                            self._fall_back(rid, found)
                            owned.on_fallback = True
                        else:
                            owned.plan = found
                            assembler.rebind(found.epoch)
                            self.recovery.replanned(time.perf_counter() - owned.failed_at)
                    except PipelineFailed:
                        self.recovery.outcome("failed")
                        raise
                    drain(owned.inbox)
                    self.stats.recoveries += 1
            self.stats.finished += 1
        except (GeneratorExit, asyncio.CancelledError):
            self.stats.cancelled += 1  # the client went away: not a failure of the pipeline
            raise
        except BaseException:
            self.stats.failed += 1
            raise
        finally:
            del self.requests[rid]
            await self._close(rid, [s.node_id for s in owned.plan.stages])

    async def _attempt(self, rid: str, job: GenerationJob, owned: Owned, started: float) -> AsyncGenerator[Delta]:
        """Run (or replay and continue) the request on ``owned.plan`` until it finishes."""
        plan, assembler = owned.plan, owned.assembler
        stage_nodes = [s.node_id for s in plan.stages]
        history = assembler.token_ids
        if owned.trace is not None:
            owned.trace.plan(plan.epoch, plan.stages)
        # Exact replay: the prompt chunks, then the stages feed each known token forward one decode step each.
        # Fast replay: prompt and known tokens in one batched re-prefill; the last chunk samples position
        # len(history).
        fast = owned.mode is ReplayMode.FAST and bool(history)
        if fast:
            await self._open(rid, job, plan, job.max_tokens, history, first_position=len(history))
            chunks = prompt_chunks([*job.prompt_ids, *history])
        else:
            await self._open(rid, job, plan, job.max_tokens, history)
            chunks = prompt_chunks(job.prompt_ids)
        for step, chunk in enumerate(chunks):
            final = step == len(chunks) - 1
            await self.send(
                stage_nodes[0],
                StepInput(
                    request_id=rid,
                    plan_epoch=plan.epoch,
                    step=step,
                    position=len(history) if fast and final else 0,
                    tokens=tuple(chunk),
                    final=final,
                ),
            )
        # A replay recomputes the history before the next new token: allow for it in the first deadline.
        deadline = self.config.first_token_timeout_s + self.config.token_timeout_s * len(history)
        while not assembler.finished:
            if assembler.next_position >= job.max_tokens:
                yield assembler.finish_length().timed(owned.first_token_s)
                return
            waited = time.perf_counter()
            message = await self._next(owned, deadline, rid)
            if assembler.next_position > len(history):
                self.step_deadline.observe(time.perf_counter() - waited)
            deadline = self.step_deadline.deadline()
            if isinstance(message, StageFailure) and message.plan_epoch not in (-1, plan.epoch):
                self.stats.late_messages += 1  # a stage of the plan this request already left
                continue
            if isinstance(message, StageFailure):
                raise PipelineFailed(
                    f"stage {message.node_id} failed request {rid}: {message.detail}",
                    kind=failure_kind(message.detail),
                    node_id=message.node_id,
                )
            step_result = self._accept(owned, message, started, len(history))
            if owned.trace is not None:
                trace_token(owned.trace, message, step_result)
            if step_result.missing:
                self.stats.resend_requests += 1
                await self.send(stage_nodes[-1], ResendTokens(request_id=rid, positions=step_result.missing))
            for delta in step_result.deltas:
                yield delta

    def _accept(self, owned: Owned, chunk: TokenChunk, started: float, replayed: int) -> AssemblyStep:
        """Hand ``chunk`` to the assembler; stamp the first token's time on the delta that carries it and,
        after a recovery, note the time to resume."""
        assembler = owned.assembler
        step = assembler.accept(chunk)
        self._check(owned, step)
        for delta in step.deltas:
            for finding in owned.output.feed(delta.text):
                self.validation.output_findings += 1
                rid = assembler.request_id
                log.warning("request %s: the answer looks corrupt: %s %s", rid, finding.kind.value, finding.detail)
                if owned.trace is not None:
                    owned.trace.event("output_finding", corruption=finding.kind.value, severity=finding.severity.value)
        if owned.first_token_s is None and assembler.next_position > 0:
            owned.first_token_s = time.perf_counter() - started
        if any(delta.starts for delta in step.deltas):
            step = replace(step, deltas=tuple(d.timed(owned.first_token_s) for d in step.deltas))
        if owned.failed_at is not None and assembler.next_position > replayed:
            how = "fallback" if owned.on_fallback else "resumed"
            self.recovery.outcome(how, time.perf_counter() - owned.failed_at, mode=owned.mode.value)
            owned.failed_at = None
        return step

    async def _fallback_attempt(
        self, rid: str, job: GenerationJob, owned: Owned, started: float
    ) -> AsyncGenerator[Delta]:
        """Replay and continue the request on this node's single-device fallback until it finishes."""
        assert self.fallback is not None
        assembler = owned.assembler
        history = assembler.token_ids
        sealer = TokenTransferValidator()
        self.stats.fallbacks += 1
        tokens = self.fallback.generate(
            rid, job.prompt_ids, job.params, history, mode=owned.mode, max_tokens=job.max_tokens
        )
        try:
            async with aclosing(tokens) as stream:
                async for position, token in stream:
                    chunk = sealer.seal(
                        TokenChunk(
                            request_id=rid,
                            sequence_position=position,
                            token_id=token.token,
                            source_device_rank=0,
                            plan_epoch=owned.plan.epoch,
                            logprob=token.logprob,
                            top_logprobs=token.top,
                        )
                    )
                    step = self._accept(owned, chunk, started, len(history))
                    for delta in step.deltas:
                        yield delta
                    if assembler.finished:
                        return
        except (FallbackUnavailable, WorkerClosed, WorkerTimeout) as exc:
            raise PipelineFailed(
                f"request {rid}: the single-device fallback failed: {exc}",
                kind=FailureKind.NO_PLAN,
                node_id=self.node_id,
            ) from exc
        if not assembler.finished:
            yield assembler.finish_length().timed(owned.first_token_s)

    def _fall_back(self, rid: str, why: str) -> None:
        """No plan fits the surviving nodes (catastrophic): go on with the fallback, or fail with a clear error."""
        decision = self.recovery.classify(self.recovery.event(FailureKind.NO_PLAN, self.node_id, (rid,), why))
        if self.fallback is None:
            raise PipelineFailed(
                f"request {rid}: no pipeline plan fits the surviving nodes ({why}), and this node has no "
                "single-device fallback",
                kind=FailureKind.NO_PLAN,
                node_id=self.node_id,
            )
        if (reason := self.fallback.unavailable()) is not None:
            raise PipelineFailed(
                f"request {rid}: no pipeline plan fits the surviving nodes ({why}), and the single-device "
                f"fallback cannot hold the model: {reason}",
                kind=FailureKind.NO_PLAN,
                node_id=self.node_id,
            )
        log.warning(
            "request %s: %s (%s): %s; continuing on this node alone",
            rid,
            why,
            decision.failure_class,
            decision.mechanism,
        )

    async def _healthy_plan(self, rid: str, failed: PlanCommit, *, newer: bool) -> PlanCommit | str:
        """A committed plan whose every stage is a live member (a new one if ``failed`` lost a node), or why no
        plan fits the surviving nodes. With ``newer``, one committed after ``failed``: its stages left it for a
        plan being loaded (retrying ``failed`` would be refused again until that plan is committed)."""

        def fits(plan: PlanCommit) -> bool:
            return self.plans.healthy(plan) and (not newer or plan.epoch > failed.epoch)

        try:
            return await self.plans.wait_recoverable(fits, self.config.recovery_timeout_s)
        except TimeoutError as exc:
            raise PipelineFailed(
                f"request {rid}: no healthy plan within {self.config.recovery_timeout_s:.0f}s after plan "
                f"{failed.epoch} failed"
            ) from exc

    def on_plan_committed(self, plan: PlanCommit) -> None:
        """A new plan was committed: requests already running keep theirs (the stages of a replaced plan
        drain them: their steps carry their plan's epoch); only new requests use ``plan``. A stage that
        cannot keep an old plan's request tells its owner (a StageFailure), which then replays it."""
        for owned in self.requests.values():
            if owned.plan.epoch < plan.epoch:
                self.stats.kept_plan += 1

    def on_peer_down(self, node_id: str) -> None:
        """A node went away: every request whose plan uses it fails now (and recovers), not at a deadline."""
        for rid, owned in self.requests.items():
            if any(s.node_id == node_id for s in owned.plan.stages):
                failure = StageFailure(request_id=rid, node_id=node_id, detail=f"node {node_id} is down")
                try:
                    owned.inbox.put_nowait(failure)
                except asyncio.QueueFull:
                    owned.overflowed = True

    async def _next(self, owned: Owned, timeout: float, rid: str) -> TokenChunk | StageFailure:  # noqa: ASYNC109
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
        self,
        rid: str,
        job: GenerationJob,
        plan: PlanCommit,
        budget: int,
        history: tuple[int, ...] = (),
        *,
        first_position: int = 0,
    ) -> None:
        name = f"open/{rid}"
        owned = self.requests.get(rid)
        level = self.config.validation if owned is None else owned.level
        message = RequestOpen(
            request_id=rid,
            owner=self.node_id,
            plan_epoch=plan.epoch,
            sampling=params_to_wire(job.params),
            max_tokens=budget,
            prompt_tokens=len(job.prompt_ids),
            barrier=name,
            history=history,
            first_position=first_position,
            validation=level.value,
            spot_check_fraction=self.config.spot_check_fraction if level is ValidationLevel.STRICT else 0.0,
            spot_check_seed=self.config.spot_check_seed,
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
                kind = open_refusal_kind(exc.failures)
                raise PipelineFailed(f"request {rid} could not start: {exc}", kind=kind, node_id=missing) from exc

    async def _close(self, rid: str, nodes: list[str], reason: str = "finished") -> None:
        for node in nodes:
            try:
                await self.send(node, RequestClose(request_id=rid, reason=reason))
            except (ConnectionError, TimeoutError) as exc:
                # The stage is gone or unreachable: its caches went with it, or its link will deliver later.
                log.warning("request %s: could not tell %s to close: %r", rid, node, exc)

    def statistics(self) -> OwnerStatistics:
        return OwnerStatistics(
            active=len(self.requests),
            counters=replace(self.stats),
            replay=self.config.replay.value,
            step_deadline_s=self.step_deadline.deadline(),
            recovery=self.recovery.statistics(),
            validation=self.validation_statistics(),
            fallback=None if self.fallback is None else self.fallback.statistics(),
        )

    def snapshot(self) -> dict[str, Any]:
        return self.statistics().as_dict()

    # -- validation levels -----------------------------------------------------------------------------

    def level_for(self, requested: ValidationLevel | None) -> ValidationLevel:
        """The level a new request runs at: what it asked for (or the node's), raised by adaptive strictness
        when corruption or retransmits were seen lately; counted by level."""
        self.adaptive.observe(self.integrity())
        level = self.adaptive.effective(requested)
        self.validation.requests[level.value] += 1
        return level

    def integrity(self) -> IntegrityCounters:
        """What adaptive strictness reads: this owner's findings plus its node's links' (when it was given them)."""
        own = self.own_integrity()
        if self.link_integrity is None:
            return own
        links = self.link_integrity()
        return IntegrityCounters(
            corruptions=own.corruptions + links.corruptions, retransmits=own.retransmits + links.retransmits
        )

    def own_integrity(self) -> IntegrityCounters:
        """Corruption this owner saw: tokens failing their checksum, invalid deltas, and the stages' reports of
        bad activations and spot-check mismatches (failure events)."""
        events = self.recovery.stats.events
        v = self.validation
        return IntegrityCounters(
            corruptions=v.token_checksum_failures
            + v.invalid_utf8_deltas
            + events[FailureKind.CHECKSUM.value]
            + events[FailureKind.SPOT_CHECK.value]
        )

    def _check(self, owned: Owned, step: AssemblyStep) -> None:
        """Count what the assembler rejected; check the deltas at the request's level (a delta that is not
        valid UTF-8 is never sent: the request ends with :class:`CorruptOutput`)."""
        if step.rejected is not None:
            self.validation.tokens_rejected += 1
            if step.rejected.error_type is ValidationError.CHECKSUM_MISMATCH:
                self.validation.token_checksum_failures += 1
        if owned.deltas is None:
            return
        for delta in step.deltas:
            found = owned.deltas.check(delta.text)
            if found is None:
                continue
            rid = owned.assembler.request_id
            if found.fatal:
                self.validation.invalid_utf8_deltas += 1
                raise CorruptOutput(f"request {rid}: {found.result.detail}")
            # Strict's EncodingValidator: U+FFFD or control characters may be the model's own output.
            self.validation.suspicious_deltas += 1
            log.warning("request %s: suspicious delta: %s", rid, found.result.detail)

    def validation_statistics(self) -> ValidationStatistics:
        self.adaptive.observe(self.integrity())  # the adaptive level as of now, not as of the last request
        v = self.validation
        return ValidationStatistics(
            default=self.config.validation.value,
            spot_check_fraction=self.config.spot_check_fraction,
            counters=replace(v, requests=dict(v.requests)),
            adaptive=self.adaptive.statistics(),
        )


__all__ = ["CorruptOutput", "NoPlan", "OwnerConfig", "OwnerStats", "PipelineFailed", "PipelineOwner", "Plans", "Send"]
