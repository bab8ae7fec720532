"""StageActor: one shard of the model on its own MLX thread, serving every request's steps.

Stage 0 takes token ids (prompt chunks from the request owner, then each generated token from the last
stage); every other stage takes hidden states from the stage before it, as checksummed activation chunks.
The last stage picks each token with the request's own sampler and sends it, sealed with its checksum, to
the request owner and (unless the request's token budget is spent) to stage 0 as the next step.

Steps are batched: a step taken in is checked and queued (bounded, :mod:`exo_stable.pipeline.stagebatch`);
the stage's batch loop runs the ready decode steps of several requests as one forward call and sends each
row's result on exactly as a step computed alone (:mod:`exo_stable.pipeline.stagework` holds the MLX side).

The owner decides when a request is over and says so with RequestClose; a step that arrives for a request
this stage no longer holds is dropped and counted (the pipeline may run a token ahead of the owner).

The stage's settings, per-request state, counters and timing records are in
:mod:`exo_stable.pipeline.stagestate`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgspec

from actors import Actor
from exo_stable.engine.grammar import GrammarError
from exo_stable.engine.loader import ModelSource
from exo_stable.engine.mlx_thread import MlxThread
from exo_stable.engine.model import LayerRange
from exo_stable.engine.slicing import SliceClock
from exo_stable.engine.stagecompute import StageBusy, StageCompute, UnknownRequest
from exo_stable.pipeline.levels import ValidationLevel, spot_check_chosen
from exo_stable.pipeline.sampling import params_from_wire
from exo_stable.pipeline.stagebatch import ReadyStep, StepQueue
from exo_stable.pipeline.stagefaults import StageFaultConfig, StageFaults
from exo_stable.pipeline.stagestate import (
    MAX_PENDING_HOPS,
    InjectedStageCrash,
    Reading,
    Send,
    SpotCheckMismatch,
    StageConfig,
    StageMessage,
    StageRequest,
    StageStatistics,
    StageStats,
    Timing,
    stage_faults,
    timed,
    wire_level,
)
from exo_stable.pipeline.stagework import StageWork
from exo_stable.wire.messages import (
    ActivationChunk,
    BarrierArrive,
    RequestClose,
    RequestOpen,
    ResendTokens,
    StageFailure,
    StepHop,
    StepInput,
    TensorPayload,
    TokenChunk,
)
from exo_stable.wire.tensors import ActivationAssembler, TensorError, chunk_activation
from exo_stable.wire.validation import TokenTransferValidator

log = logging.getLogger(__name__)


class StageActor(Actor[StageMessage]):
    """Holds layers ``stages[index]`` of the plan; see the module docstring for the data path."""

    mailbox_size = 4096
    _compute: StageCompute

    def __init__(self, source: ModelSource, config: StageConfig, send: Send, *, keep: StageActor | None = None) -> None:
        """``keep``: the stage this one replaces on the node (a new plan); the layers it built are taken over."""
        self.source = source
        self.config = config
        me = config.stages[config.index]
        self.layers = LayerRange(me.start, me.end, source.spec.num_hidden_layers)
        self._send = send
        self._compute = StageCompute(
            source,
            self.layers,
            config.dtype,
            max_requests=config.max_requests,
            batch=config.batch,
            batch_limit=config.batch_limit,
            keep=None if keep is None else keep._compute,
        )
        self._thread: MlxThread | None = None
        self._requests: dict[str, StageRequest] = {}
        self._assembler = ActivationAssembler(max_pending=config.max_requests * 4)
        self._validator = TokenTransferValidator()
        self.stats = StageStats()
        self.load_s = 0.0
        self.faults = stage_faults()
        integrity = StageFaultConfig.from_env() or StageFaultConfig()
        faults = StageFaults(integrity, stage=config.index)  # off unless configured
        self._idle = asyncio.Event()
        self._idle.set()
        self._work = StageWork(self._compute, config.index, self.is_last, faults, self.stats)
        self._queue = StepQueue(config.max_queued_steps)
        self._reading: deque[Reading] = deque()  # prompt chunks taken, being evaluated slice by slice
        self._clock = SliceClock(config.prefill_share)

    @property
    def integrity_faults(self) -> StageFaults:
        """Injected integrity faults (tests only; off unless configured), shared with the MLX side."""
        return self._work.faults

    @integrity_faults.setter
    def integrity_faults(self, faults: StageFaults) -> None:
        self._work.faults = faults

    def default_name(self) -> str:
        return f"stage{self.config.index}{self.layers}"

    @property
    def is_first(self) -> bool:
        return self.layers.is_first

    @property
    def is_last(self) -> bool:
        return self.layers.is_last

    @property
    def open_requests(self) -> int:
        return len(self._requests)

    @property
    def queued_steps(self) -> int:
        """Ready steps waiting for the compute thread."""
        return len(self._queue)

    def owner_of(self, request_id: str) -> str | None:
        request = self._requests.get(request_id)
        return None if request is None else request.owner

    def request_owners(self) -> list[tuple[str, str, int]]:
        """(request id, owner node, plan epoch) of every request this stage holds."""
        return [(rid, request.owner, request.plan_epoch) for rid, request in self._requests.items()]

    async def wait_idle(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until this stage holds no request (every owner closed its requests)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def on_start(self) -> None:
        self._thread = MlxThread(f"mlx-stage{self.config.index}")
        self.load_s = await self._thread.run(self._compute.load, timeout=self.config.load_timeout_s)
        log.info("%s loaded layers %s in %.2fs", self.config.node_id, self.layers, self.load_s)
        self.start_task(self._batch_loop(), name=f"stage{self.config.index}-batches")

    async def on_failure(self, exc: BaseException) -> None:
        """This stage crashed: every request it held fails here now (their owners replay them), not at
        their step deadlines."""
        for rid, request in list(self._requests.items()):
            failure = StageFailure(
                request_id=rid,
                node_id=self.config.node_id,
                detail=f"stage {self.config.index} crashed: {exc!r}",
                plan_epoch=request.plan_epoch,
            )
            try:
                await self._send(request.owner, failure)
            except (ConnectionError, TimeoutError) as send_exc:
                log.warning("stage %d could not report its crash to %s: %r", self.config.index, request.owner, send_exc)
        self._requests.clear()
        self._idle.set()

    async def on_stop(self) -> None:
        if self._thread is not None:
            self._thread.close()

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._thread is not None
        return await self._thread.run(fn, *args, timeout=self.config.step_timeout_s)

    def _next_node(self) -> str:
        return self.config.stages[self.config.index + 1].node_id

    async def receive(self, message: StageMessage) -> Any:
        match message:
            case RequestOpen():
                await self._open(message)
            case StepInput():
                await self._step_tokens(message)
            case ActivationChunk():
                await self._step_activation(message)
            case RequestClose(request_id=rid):
                self._requests.pop(rid, None)
                self._assembler.discard(rid)
                self._queue.discard(rid)
                await self._run(self._compute.close, rid)
                if not self._requests:
                    self._idle.set()
            case ResendTokens(request_id=rid, positions=positions):
                await self._resend(rid, positions)
        return None

    async def _open(self, msg: RequestOpen) -> None:
        ok, detail = True, ""
        params = params_from_wire(msg.sampling)
        known = self._requests.get(msg.request_id)
        if known is not None and known.plan_epoch != msg.plan_epoch:
            # The owner moved the request to another plan (recovery): start its caches afresh.
            self._requests.pop(msg.request_id)
            self._assembler.discard(msg.request_id)
            self._queue.discard(msg.request_id)
            await self._run(self._compute.close, msg.request_id)
        try:
            held = sum(1 for r in self._requests.values() if r.owner == msg.owner)
            if msg.request_id not in self._requests and held >= self.config.max_requests_per_owner:
                self.stats.refused_per_owner += 1
                raise StageBusy(f"{msg.owner} already holds {held} of this stage's requests")
            await self._run(self._compute.open, msg.request_id, params, msg.history)
            self._requests[msg.request_id] = StageRequest(
                msg.owner,
                msg.plan_epoch,
                msg.max_tokens,
                msg.history,
                first_position=msg.first_position,
                level=wire_level(msg.validation),
                spot_fraction=msg.spot_check_fraction,
                spot_seed=msg.spot_check_seed,
                greedy=params.plain_greedy,
            )
            self._idle.clear()
        except (StageBusy, GrammarError) as exc:
            ok, detail = False, str(exc)
        try:
            await self._send(
                msg.owner, BarrierArrive(name=msg.barrier, member=self.config.node_id, ok=ok, detail=detail)
            )
        except (ConnectionError, TimeoutError) as exc:
            log.warning("stage %d cannot answer %s's request %s: %r", self.config.index, msg.owner, msg.request_id, exc)
            if ok:
                self._requests.pop(msg.request_id, None)
                await self._run(self._compute.close, msg.request_id)

    async def _step_tokens(self, msg: StepInput) -> None:
        arrived = time.time(), time.perf_counter()
        if not self.is_first:
            raise RuntimeError(f"token step sent to stage {self.config.index}, which is not the first")
        request = self._requests.get(msg.request_id)
        if request is None or request.plan_epoch != msg.plan_epoch:
            # Closed, or a step of the plan this request left (a replaced plan's stage still draining it).
            self.stats.stale_steps += 1
            return
        ready = ReadyStep(msg.request_id, request, msg.step, msg.position, msg.final, *arrived, tokens=msg.tokens)
        await self._enqueue(ready)

    async def _step_activation(self, chunk: ActivationChunk) -> None:
        arrived = time.time(), time.perf_counter()
        request = self._requests.get(chunk.request_id)
        if request is None or request.plan_epoch != chunk.plan_epoch:
            # Closed, or a step of the plan this request left (a replaced plan's stage still draining it).
            self.stats.stale_steps += 1
            return
        try:
            tensor = self._assembler.add(chunk, verify=request.level is not ValidationLevel.OFF)
        except TensorError as exc:
            # The link already retransmits corrupted frames; a bad tensor here is a bug or memory fault.
            self.stats.bad_activations += 1
            await self._fail(chunk.request_id, request, f"bad activation: {exc}", chunk.step)
            return
        if tensor is not None and request.level is ValidationLevel.STRICT and chunk.source_checksum != tensor.checksum:
            # The sender's checksum, taken where the tensor left its layers, disagrees with the bytes that came:
            # they changed in the sender's memory before framing (every later checksum was computed over them).
            self.stats.bad_activations += 1
            self.stats.source_checksum_failures += 1
            what = "carries no source checksum" if chunk.source_checksum < 0 else "fails the sender's source checksum"
            await self._fail(chunk.request_id, request, f"bad activation: step {chunk.step} {what}", chunk.step)
            return
        if tensor is not None:
            rid, step, position, final = chunk.request_id, chunk.step, chunk.position, chunk.final
            ready = ReadyStep(rid, request, step, position, final, *arrived, tensor=tensor, hops=chunk.hops)
            await self._enqueue(ready)

    async def _enqueue(self, ready: ReadyStep) -> None:
        """Queue a checked step for the batch loop, waiting for room (back-pressure: this actor takes no
        further message until there is room, so its mailbox fills and its senders wait)."""
        await self._queue.wait_room(self.config.step_timeout_s)
        self._queue.put(ready)

    async def _batch_loop(self) -> None:
        """The stage's compute loop (owned by the actor: an exception here crashes the stage, and every
        request it holds is failed to its owner for replay). Each turn takes what the queue picks: the ready
        decode steps of several requests run as one batched forward call, then at most the budget's prompt
        chunks, one call each; requests open and close between turns. While requests decode, a prompt
        chunk's call is evaluated a few layers per turn (:mod:`exo_stable.engine.slicing`) and no other chunk
        is taken until it is done, so a turn takes about twice a decode step, not a whole chunk's time."""
        while True:
            if not self._reading:
                await self._queue.wait_ready()
            work = self._queue.take(
                max_batch=self._batch_limit(), token_budget=self.config.step_token_budget, chunks=not self._reading
            )
            self.stats.queue_depth.observe(work.depth)
            rows = [r for r in work.decode if self._current(r)]
            for row in rows:
                row.request.decoding = True
            if len(rows) > 1:
                # The next turn takes these rows again (those that go on) unless other decode steps wait
                # before them or a prompt chunk is read beside them.
                again = not (work.chunks or self._reading or self._queue.decode_waiting())
                await self._forward_rows(rows, again=again)
            elif rows:
                await self._forward(rows[0])
            for chunk in work.chunks:
                if self._current(chunk):
                    await self._begin(chunk)
            if self._reading:
                await self._read(decoding=any(r.decoding for r in self._requests.values()))

    def _batch_limit(self) -> int:
        """Rows for this compute step: the open requests split over as many micro-batches as the plan has
        stages, at most the rows its compute may batch (StageCompute.batch_limit). One batch of every request
        would move round the ring as one block, with a single stage busy at a time; as many blocks as stages
        keep every stage computing at once."""
        stages = len(self.config.stages)
        return max(1, min(self._compute.batch_limit, -(-len(self._requests) // stages)))

    def _current(self, ready: ReadyStep) -> bool:
        """Whether the request the step was taken in for is still open here (not closed, failed or reopened
        under another plan since); a step that is not current is dropped and counted."""
        if self._requests.get(ready.rid) is ready.request:
            return True
        self.stats.stale_steps += 1
        return False

    def _spot(self, ready: ReadyStep) -> bool:
        request: StageRequest = ready.request
        return request.level is ValidationLevel.STRICT and spot_check_chosen(
            request.spot_fraction, request.spot_seed, ready.rid, ready.step, self.config.index
        )

    def _forced(self, ready: ReadyStep) -> int | None:
        """A replay's known token at the step's position (the penalties of later positions see it)."""
        history = ready.request.history
        return history[ready.position] if ready.final and ready.position < len(history) else None

    async def _begin(self, ready: ReadyStep) -> None:
        """Build a prompt chunk's call, to be evaluated by :meth:`_read` over the next turns."""
        if "crash_every_step" in self.faults:
            raise InjectedStageCrash(f"injected crash of stage {self.config.index} at step {ready.step} of {ready.rid}")
        checks = (ready.request.level, self._spot(ready))
        try:
            call = await self._run(self._work.begin, ready, checks)
        except UnknownRequest:
            self.stats.stale_steps += 1
            return
        self._reading.append(Reading(ready, call, checks))

    async def _read(self, *, decoding: bool) -> None:
        """Evaluate the prompt chunks being read, oldest first, within this turn's budget (all of them when
        no request decodes beside them, see SliceClock.budget); a chunk read through goes on as a step
        computed in one call would."""
        within = self._clock.budget(decoding=decoding)
        while self._reading:
            reading = self._reading[0]
            ready, call = reading.ready, reading.call
            if not self._current(ready):
                self._reading.popleft()
                continue
            done = await self._run(call.advance, self._clock.layers(call.left, call.positions, within))
            self._clock.sliced(call.stepped, call.positions, call.stepped_s)
            if not done:
                self.stats.prompt_slices += 1
                return
            self._reading.popleft()
            await self._finish_reading(reading)
            if within is not None:
                within -= call.stepped_s
                if within <= 0:
                    return

    async def _finish_reading(self, reading: Reading) -> None:
        """A prompt chunk read through: its result leaves as a step computed in one call would."""
        ready, call = reading.ready, reading.call
        try:
            out = await self._run(self._work.finish_sliced, ready, call, reading.checks, self._forced(ready))
        except UnknownRequest:
            self.stats.stale_steps += 1
            return
        except SpotCheckMismatch as exc:
            self.stats.spot_check_mismatches += 1
            await self._fail(ready.rid, ready.request, f"spot check mismatch: {exc}", ready.step)
            return
        self.stats.batch_size.observe(1)
        if self._current(ready):
            await self._deliver(ready, out, call.seconds, batch=1, ahead=False)

    async def _forward_rows(self, rows: list[ReadyStep], *, again: bool) -> None:
        """The decode steps of several requests in one forward call, then each row's result on its way as a
        step computed alone would send it (its own checksums, validation and trace hop, which notes the batch).
        ``again``: the next turn is expected to take the same rows (those that go on), nothing else."""
        if "crash_every_step" in self.faults:
            raise InjectedStageCrash(f"injected crash of stage {self.config.index} in a batch of {len(rows)}")
        checks = [(r.request.level, self._spot(r)) for r in rows]
        forced = [self._forced(r) for r in rows]
        ahead = 2 <= len(rows) <= self._compute.batch_limit and all(self._decodes_ahead(r) for r in rows)
        follow: list[int] | None = None
        if ahead:
            # The next batched step is queued on the device before this one's tokens are read, for the rows
            # that go on; only when the next turn takes them alone: other rows would undo it, and a prompt
            # chunk's slices would wait for it (the slice clock would take the step's time for the chunk's).
            follow = [i for i, r in enumerate(rows) if r.position + 1 < r.request.max_tokens] if again else []
        work = functools.partial(self._work.rows, follow=follow)
        outs, compute_s = await self._run(timed, work, rows, checks, forced)
        self._clock.decoded(compute_s)
        self.stats.batch_size.observe(len(rows))
        self.stats.batched_rows += len(rows)
        for ready, out in zip(rows, outs, strict=True):
            if isinstance(out, UnknownRequest) or not self._current(ready):
                continue
            if isinstance(out, SpotCheckMismatch):
                self.stats.spot_check_mismatches += 1
                await self._fail(ready.rid, ready.request, f"spot check mismatch: {out}", ready.step)
                continue
            await self._deliver(ready, out, compute_s, batch=len(rows), ahead=ahead)

    def _decodes_ahead(self, ready: ReadyStep) -> bool:
        """Whether the step's next one may be queued on the device before its token is read (alone,
        StageCompute.pick_ahead, or as a row of a batch, pick_rows_ahead): a one-stage plan holds the whole
        model, the request is greedy and not strict (the strict level recomputes steps). (A replay feeds the
        token its client has; where it differs the queued step is undone.)"""
        return (
            self.config.decode_ahead
            and self.is_first
            and self.is_last
            and ready.final
            and ready.request.greedy
            and ready.request.level is not ValidationLevel.STRICT
        )

    async def _forward(self, ready: ReadyStep) -> None:
        """Run the only ready decode step (prompt chunks go through :meth:`_begin` and :meth:`_read`)."""
        rid, request, step, position = ready.rid, ready.request, ready.step, ready.position
        if "crash_every_step" in self.faults:
            raise InjectedStageCrash(f"injected crash of stage {self.config.index} at step {step} of {rid}")
        spot = self._spot(ready)
        ahead = self._decodes_ahead(ready)
        try:
            queue_next = position + 1 < request.max_tokens
            step_fn = functools.partial(
                self._work.step, ahead=queue_next if ahead else None, forced=self._forced(ready)
            )
            out, compute_s = await self._run(timed, step_fn, ready, (request.level, spot))
        except UnknownRequest:
            self.stats.stale_steps += 1
            return
        except SpotCheckMismatch as exc:
            # Which of the two results is right is unknown: fail the step; the owner replays the request,
            # which regenerates this step's token.
            self.stats.spot_check_mismatches += 1
            await self._fail(rid, request, f"spot check mismatch: {exc}", step)
            return
        self.stats.batch_size.observe(1)
        self._clock.decoded(compute_s)
        if self._current(ready):
            await self._deliver(ready, out, compute_s, batch=1, ahead=ahead)

    async def _deliver(self, ready: ReadyStep, out: Any, compute_s: float, *, batch: int, ahead: bool) -> None:
        """Send one step's result on: hidden states to the next stage, or the picked token to its owner and
        round to stage 0; ``hops``: the trace facts of the stages before this one for the same step."""
        rid, request, step, position, final = ready.rid, ready.request, ready.step, ready.position, ready.final
        hops = ready.hops
        self.stats.steps += 1
        timing = Timing(ready.arrived_wall, time.perf_counter() - ready.arrived_clock, compute_s)
        n_tokens = ready.width
        if not self.is_last:
            dtype, shape, data, source = out
            data = self.integrity_faults.memory(dtype, data)  # injected for tests only; off unless configured
            payload = TensorPayload.from_bytes(dtype, shape, data)
            pieces = chunk_activation(
                payload,
                request_id=rid,
                step=step,
                plan_epoch=request.plan_epoch,
                position=position,
                final=final,
                source_checksum=source,
            )
            checksum = f"{payload.checksum:08x}"
            hop = self._hop(
                step, position, tokens=n_tokens, timing=timing, bytes_out=len(data), checksum=checksum, batch=batch
            )
            pieces = [msgspec.structs.replace(piece, hops=(*hops, hop)) for piece in pieces]
            try:
                for piece in pieces:
                    await self._send(self._next_node(), piece)
            except (ConnectionError, TimeoutError) as exc:
                # The next stage is unreachable: this request cannot go on here; its owner recovers it.
                await self._fail(rid, request, f"cannot reach {self._next_node()}: {exc!r}", step)
                return
            if final and not ahead:
                await self._build_ahead(rid, request, position)
            return
        if not final or position < len(request.history):
            # No token leaves with this step: its hops wait for the next one that does.
            own = self._hop(step, position, tokens=n_tokens, timing=timing, bytes_out=0, checksum="", batch=batch)
            self._keep_hops(request, (*hops, own))
        if not final:
            return  # a prompt chunk that is not the last one: nothing to sample yet
        if position < len(request.history):
            # Replaying after a failure: the owner already has this token. Feed it forward (the same forward
            # calls as the original run rebuild the caches exactly); a different pick means the replay is
            # not exact, which is counted and logged but cannot change what the client already has.
            known = request.history[position]
            self.stats.replayed += 1
            if out.token != known:
                self.stats.replay_divergences += 1
                log.warning(
                    "request %s: replay picked %d at position %d, history has %d", rid, out.token, position, known
                )
            try:
                await self._continue(rid, request, step, position, known)
            except (ConnectionError, TimeoutError) as exc:
                await self._fail(rid, request, f"cannot reach stage 0: {exc!r}", step)
                return
            if not ahead:
                await self._build_ahead(rid, request, position)
            return
        token = TokenChunk(
            request_id=rid,
            sequence_position=position,
            token_id=out.token,
            source_device_rank=self.config.index,
            plan_epoch=request.plan_epoch,
            logprob=out.logprob,
            top_logprobs=out.top,
        )
        if request.level is not ValidationLevel.OFF:
            token = self._validator.seal(token)
        request.sent.append(token)
        self.stats.tokens_sent += 1
        own = self._hop(
            step, position, tokens=n_tokens, timing=timing, bytes_out=0, checksum=token.checksum, batch=batch
        )
        trail = (*request.pending_hops, *hops, own)
        outgoing = msgspec.structs.replace(token, hops=trail, hops_lost=request.hops_lost)
        request.pending_hops.clear()
        request.hops_lost = 0
        if self.integrity_faults.enabled:  # injected for tests only: the copy kept for resends stays right
            outgoing = msgspec.structs.replace(outgoing, token_id=self.integrity_faults.token(token.token_id))
        try:
            # Stage 0 first: the next step waits on it, while the owner only hands the token to its client.
            await self._continue(rid, request, step, position, token.token_id)
            await self._send(request.owner, outgoing)
        except (ConnectionError, TimeoutError) as exc:
            await self._fail(rid, request, f"cannot deliver position {position}: {exc!r}", step)
            return
        if not ahead:
            await self._build_ahead(rid, request, position)

    async def _build_ahead(self, rid: str, request: StageRequest, position: int) -> None:
        """With this step's result sent on, build the graph of the request's next step (the one at
        ``position + 1``) while the other stages compute: when its input comes, only the device work is left.

        Only while the stage serves this one request: then it would sit idle until the input comes. With
        several, other requests' steps fill that time, and a graph built with the device idle (nothing can
        start before the input is there) costs throughput: measured on two H200s, 4 and 16 streams made 23%
        fewer tokens/s when every step was built ahead. Not when no next step will come (the budget is spent).
        """
        if not self.config.build_ahead or position + 1 >= request.max_tokens or rid not in self._requests:
            return
        if len(self._requests) > 1:
            self.stats.build_ahead_busy += 1
        else:
            try:
                await self._run(self._compute.prepare, rid)
            except UnknownRequest:
                self.stats.stale_steps += 1

    def _hop(
        self, step: int, position: int, *, tokens: int, timing: Timing, bytes_out: int, checksum: str, batch: int = 1
    ) -> StepHop:
        """This stage's trace facts for one step."""
        return StepHop(
            node_id=self.config.node_id,
            stage=self.config.index,
            start=self.layers.start,
            end=self.layers.end,
            step=step,
            position=position,
            tokens=tokens,
            stage_s=timing.stage_s,
            bytes_out=bytes_out,
            checksum=checksum,
            received_at=timing.received_at,
            compute_s=timing.compute_s,
            batch=batch,
        )

    @staticmethod
    def _keep_hops(request: StageRequest, hops: tuple[StepHop, ...]) -> None:
        """Hold the hops of a step that yields no token (bounded: the excess is counted, not kept)."""
        room = MAX_PENDING_HOPS - len(request.pending_hops)
        request.pending_hops.extend(hops[: max(0, room)])
        request.hops_lost += max(0, len(hops) - max(0, room))

    async def _continue(self, rid: str, request: StageRequest, step: int, position: int, token_id: int) -> None:
        """Send the token at ``position`` round to stage 0 as the next step, unless the budget is spent."""
        if position + 1 < request.max_tokens and rid in self._requests:
            if self.is_first and len(self._queue) < self._queue.capacity:
                # A one-stage plan: the next step is this stage's own. Queued now, it joins the next compute
                # step with the other rows of this one; through the mailbox it would be taken in only while
                # the next step computes, and the rows would split into ever smaller batches (measured on
                # the 2 cores, 8 streams: 2.9 rows per forward call instead of 8).
                self._queue.put(
                    ReadyStep(rid, request, step + 1, position + 1, True, time.time(), time.perf_counter(), (token_id,))
                )
                return
            nxt = StepInput(
                request_id=rid,
                plan_epoch=request.plan_epoch,
                step=step + 1,
                position=position + 1,
                tokens=(token_id,),
            )
            await self._send(self.config.stages[0].node_id, nxt)

    async def _resend(self, rid: str, positions: tuple[int, ...]) -> None:
        request = self._requests.get(rid)
        if request is None:
            return
        first = max(len(request.history), request.first_position)  # a replay sends the new positions only
        for position in positions:
            if 0 <= position - first < len(request.sent):
                self.stats.resent += 1
                await self._send(request.owner, request.sent[position - first])

    async def _fail(self, rid: str, request: StageRequest, detail: str, step: int) -> None:
        """Tell the owner this request failed here and drop it (the owner replays it elsewhere)."""
        self.stats.failures += 1
        log.warning("stage %d failed request %s at step %d: %s", self.config.index, rid, step, detail)
        self._requests.pop(rid, None)
        self._queue.discard(rid)
        await self._run(self._compute.close, rid)
        failure = StageFailure(
            request_id=rid, node_id=self.config.node_id, detail=detail, step=step, plan_epoch=request.plan_epoch
        )
        try:
            await self._send(request.owner, failure)
        except (ConnectionError, TimeoutError) as exc:
            # The owner is unreachable too: it notices the node set change (or its step deadline) by itself.
            log.warning("stage %d could not report request %s to %s: %r", self.config.index, rid, request.owner, exc)

    def kv_cache_bytes(self) -> int:
        """Bytes held by this stage's request caches (any thread; see StageCompute.kv_cache_bytes)."""
        return self._compute.kv_cache_bytes()

    def stage_statistics(self) -> StageStatistics:
        """This stage's counters (``statistics()`` is the actor's own: its mailbox and restarts)."""
        return StageStatistics(
            layers=(self.layers.start, self.layers.end),
            open_requests=len(self._requests),
            kv_cache_bytes=self.kv_cache_bytes(),
            load_s=self.load_s,
            counters=replace(self.stats),
            compute=replace(self._compute.stats),
            faults_injected=self.integrity_faults.counts.as_dict() if self.integrity_faults.enabled else None,
            batch_limit=self.config.batch_limit,
            queued=len(self._queue),
        )

    def snapshot(self) -> dict[str, Any]:
        return self.stage_statistics().as_dict()


__all__ = ["Send", "StageActor", "StageConfig", "StageMessage"]
