"""StageActor: one shard of the model on its own MLX thread, serving every request's steps.

Stage 0 takes token ids (prompt chunks from the request owner, then each generated token from the last
stage); every other stage takes hidden states from the stage before it, as checksummed activation chunks.
The last stage picks each token with the request's own sampler and sends it, sealed with its checksum, to
the request owner and (unless the request's token budget is spent) to stage 0 as the next step.

The owner decides when a request is over and says so with RequestClose; a step that arrives for a request
this stage no longer holds is dropped and counted (the pipeline may run a token ahead of the owner).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from actors import Actor
from exo_stable.loader import ModelSource
from exo_stable.mlx_thread import MlxThread
from exo_stable.model import LayerRange
from exo_stable.modelspec import Dtype
from exo_stable.sampling import SamplingParams
from exo_stable.stagecompute import StageBusy, StageCompute, UnknownRequest, tensor_from_bytes, tensor_to_bytes
from exo_stable.wire.messages import (
    ActivationChunk,
    BarrierArrive,
    Message,
    RequestClose,
    RequestOpen,
    ResendTokens,
    StageFailure,
    StageRange,
    StepInput,
    TensorPayload,
    TokenChunk,
)
from exo_stable.wire.tensors import ActivationAssembler, TensorError, chunk_activation
from exo_stable.wire.validation import TokenTransferValidator

log = logging.getLogger(__name__)

Send = Callable[[str, Message], Awaitable[None]]
StageMessage = RequestOpen | StepInput | ActivationChunk | RequestClose | ResendTokens


@dataclass
class _Request:
    owner: str
    plan_epoch: int
    max_tokens: int
    history: tuple[int, ...] = ()  # tokens of a replay: fed forward instead of sampled
    sent: list[TokenChunk] = field(default_factory=list)  # last stage: every token sent, for resends


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


@dataclass(frozen=True, slots=True)
class StageConfig:
    node_id: str
    plan_epoch: int
    stages: tuple[StageRange, ...]
    index: int
    dtype: Dtype
    max_requests: int = 16
    load_timeout_s: float = 600.0
    step_timeout_s: float = 120.0
    send_timeout_s: float = 30.0


class StageActor(Actor[StageMessage]):
    """Holds layers ``stages[index]`` of the plan; see the module docstring for the data path."""

    mailbox_size = 4096

    def __init__(self, source: ModelSource, config: StageConfig, send: Send) -> None:
        self.source = source
        self.config = config
        me = config.stages[config.index]
        self.layers = LayerRange(me.start, me.end, source.spec.num_hidden_layers)
        self._send = send
        self._compute = StageCompute(source, self.layers, config.dtype, max_requests=config.max_requests)
        self._thread: MlxThread | None = None
        self._requests: dict[str, _Request] = {}
        self._assembler = ActivationAssembler(max_pending=config.max_requests * 4)
        self._validator = TokenTransferValidator()
        self.stats = StageStats()
        self.load_s = 0.0
        self._idle = asyncio.Event()
        self._idle.set()

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

    async def wait_idle(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until this stage holds no request (every owner closed its requests)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def on_start(self) -> None:
        self._thread = MlxThread(f"mlx-stage{self.config.index}")
        self.load_s = await self._thread.run(self._compute.load, timeout=self.config.load_timeout_s)
        log.info("%s loaded layers %s in %.2fs", self.config.node_id, self.layers, self.load_s)

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
                await self._run(self._compute.close, rid)
                if not self._requests:
                    self._idle.set()
            case ResendTokens(request_id=rid, positions=positions):
                await self._resend(rid, positions)
        return None

    async def _open(self, msg: RequestOpen) -> None:
        ok, detail = True, ""
        s = msg.sampling
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)
        known = self._requests.get(msg.request_id)
        if known is not None and known.plan_epoch != msg.plan_epoch:
            # The owner moved the request to another plan (recovery): start its caches afresh.
            self._requests.pop(msg.request_id)
            self._assembler.discard(msg.request_id)
            await self._run(self._compute.close, msg.request_id)
        try:
            await self._run(self._compute.open, msg.request_id, params)
            self._requests[msg.request_id] = _Request(msg.owner, msg.plan_epoch, msg.max_tokens, msg.history)
            self._idle.clear()
        except StageBusy as exc:
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
        if not self.is_first:
            raise RuntimeError(f"token step sent to stage {self.config.index}, which is not the first")
        request = self._requests.get(msg.request_id)
        if request is None:
            self.stats.stale_steps += 1
            return
        await self._forward(msg.request_id, request, msg.step, msg.position, msg.final, tokens=msg.tokens)

    async def _step_activation(self, chunk: ActivationChunk) -> None:
        request = self._requests.get(chunk.request_id)
        if request is None:
            self.stats.stale_steps += 1
            return
        try:
            tensor = self._assembler.add(chunk)
        except TensorError as exc:
            # The link already retransmits corrupted frames; a bad tensor here is a bug or memory fault.
            self.stats.bad_activations += 1
            await self._fail(chunk.request_id, request, f"bad activation: {exc}", chunk.step)
            return
        if tensor is not None:
            await self._forward(chunk.request_id, request, chunk.step, chunk.position, chunk.final, tensor=tensor)

    async def _forward(
        self,
        rid: str,
        request: _Request,
        step: int,
        position: int,
        final: bool,
        *,
        tokens: tuple[int, ...] = (),
        tensor: TensorPayload | None = None,
    ) -> None:
        try:
            out = await self._run(self._compute_step, rid, tokens, tensor, position, final)
        except UnknownRequest:
            self.stats.stale_steps += 1
            return
        self.stats.steps += 1
        if not self.is_last:
            dtype, shape, data = out
            payload = TensorPayload.from_bytes(dtype, shape, data)
            pieces = chunk_activation(
                payload, request_id=rid, step=step, plan_epoch=request.plan_epoch, position=position, final=final
            )
            try:
                for piece in pieces:
                    await self._send(self._next_node(), piece)
            except (ConnectionError, TimeoutError) as exc:
                # The next stage is unreachable: this request cannot go on here; its owner recovers it.
                await self._fail(rid, request, f"cannot reach {self._next_node()}: {exc!r}", step)
            return
        if not final:
            return  # a prompt chunk that is not the last one: nothing to sample yet
        if position < len(request.history):
            # Replaying after a failure: the owner already has this token. Feed it forward (the same forward
            # calls as the original run rebuild the caches exactly); a different pick means the replay is
            # not exact, which is counted and logged but cannot change what the client already has.
            known = request.history[position]
            self.stats.replayed += 1
            if int(out) != known:
                self.stats.replay_divergences += 1
                log.warning("request %s: replay picked %d at position %d, history has %d", rid, out, position, known)
            try:
                await self._continue(rid, request, step, position, known)
            except (ConnectionError, TimeoutError) as exc:
                await self._fail(rid, request, f"cannot reach stage 0: {exc!r}", step)
            return
        token = self._validator.seal(
            TokenChunk(
                request_id=rid,
                sequence_position=position,
                token_id=int(out),
                source_device_rank=self.config.index,
                plan_epoch=request.plan_epoch,
            )
        )
        request.sent.append(token)
        self.stats.tokens_sent += 1
        try:
            await self._send(request.owner, token)
            await self._continue(rid, request, step, position, token.token_id)
        except (ConnectionError, TimeoutError) as exc:
            await self._fail(rid, request, f"cannot deliver position {position}: {exc!r}", step)

    async def _continue(self, rid: str, request: _Request, step: int, position: int, token_id: int) -> None:
        """Send the token at ``position`` round to stage 0 as the next step, unless the budget is spent."""
        if position + 1 < request.max_tokens and rid in self._requests:
            nxt = StepInput(
                request_id=rid,
                plan_epoch=request.plan_epoch,
                step=step + 1,
                position=position + 1,
                tokens=(token_id,),
            )
            await self._send(self.config.stages[0].node_id, nxt)

    def _compute_step(
        self, rid: str, tokens: tuple[int, ...], tensor: TensorPayload | None, position: int, final: bool
    ) -> Any:
        """On the MLX thread: one forward call; hidden-state bytes out, or the picked token on the last stage."""
        if tensor is None:
            x = mx.array([list(tokens)], dtype=mx.int32)
        else:
            x = tensor_from_bytes(tensor.dtype, tensor.shape, tensor.data)
        out = self._compute.forward(rid, x)
        if not self.is_last:
            return tensor_to_bytes(out)
        return self._compute.pick(rid, out, position) if final else None

    async def _resend(self, rid: str, positions: tuple[int, ...]) -> None:
        request = self._requests.get(rid)
        if request is None:
            return
        first = len(request.history)  # a replay sends tokens from the first new position on
        for position in positions:
            if 0 <= position - first < len(request.sent):
                self.stats.resent += 1
                await self._send(request.owner, request.sent[position - first])

    async def _fail(self, rid: str, request: _Request, detail: str, step: int) -> None:
        """Tell the owner this request failed here and drop it (the owner replays it elsewhere)."""
        self.stats.failures += 1
        log.warning("stage %d failed request %s at step %d: %s", self.config.index, rid, step, detail)
        self._requests.pop(rid, None)
        await self._run(self._compute.close, rid)
        failure = StageFailure(request_id=rid, node_id=self.config.node_id, detail=detail, step=step)
        try:
            await self._send(request.owner, failure)
        except (ConnectionError, TimeoutError) as exc:
            # The owner is unreachable too: it notices the node set change (or its step deadline) by itself.
            log.warning("stage %d could not report request %s to %s: %r", self.config.index, rid, request.owner, exc)

    def snapshot(self) -> dict[str, Any]:
        return {
            "layers": [self.layers.start, self.layers.end],
            "open_requests": len(self._requests),
            "load_s": round(self.load_s, 3),
            "steps": self.stats.steps,
            "tokens_sent": self.stats.tokens_sent,
            "stale_steps": self.stats.stale_steps,
            "replayed": self.stats.replayed,
            "replay_divergences": self.stats.replay_divergences,
        }
