"""The MLX side of one stage: a shard of the model and a KV cache per request.

Every method here runs on the stage's dedicated MLX thread. The single-device engine is this class over
all layers, so a split pipeline and one device run the very same forward calls: prompts are cut into the
same fixed-size chunks, each chunk goes through every layer in order, and the last stage picks the token
from the same logits with the same sampler.

Activations cross stages as exact bytes (:mod:`exo_stable.engine.wire`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from exo_stable.engine.batching import BatchMode, exact_limit, probe_products
from exo_stable.engine.device import DeviceKind, activate, chosen
from exo_stable.engine.grammar import Constraint
from exo_stable.engine.loader import ModelSource
from exo_stable.engine.model import LayerRange, ShardModel, compute_dtype
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import Pick, SamplingParams
from exo_stable.engine.sampling import pick as sample_pick
from exo_stable.engine.slicing import SlicedForward
from exo_stable.engine.slots import SlotArena
from exo_stable.engine.wire import WireTensor, fill_input, input_array

PREFILL_CHUNK = 512
"""Prompt tokens per forward call on a GPU; the same on every stage and on the single device."""
PREFILL_CHUNK_CPU = 128
"""Prompt tokens per forward call on a CPU. A batching step carries one chunk beside the decode rows, and on
a CPU a chunk's time is what the streams already decoding wait for each step: 128 tokens cut their
inter-token p99 under a 2,000-token prompt from 4.1 s to 1.2 s against 512 (2 cores, the default model,
benchmarks/bench_batching.py --prefill-chunk), with the long prompt's first token no later (12.6 s against
12.8 s); 64 cut it to 0.66 s but delayed that first token by a fifth. The prompt's reading is exact either
way: the owner, every stage, the fallback and the single device chunk a prompt with the same function."""

SHARED_SLOTS = True
"""Under ``--batch fast``, keep the batched requests' caches as slots of one buffer per layer
(:mod:`exo_stable.engine.slots`); read at load (benchmarks turn it off to compare)."""

QUEUED_OVERLAP = False
"""Whether a step queued ahead (:meth:`StageCompute.decode_ahead`, :meth:`StageCompute.pick_rows_ahead`)
starts on the device every few layers while it is built, as a step evaluated at once does. It waits behind
the step computing anyway, so starting it in pieces only adds launches: on an H100 a queued 16-row step of
an 8B model took 11.5 ms with it and 10.0 without (benchmarks/batch_step_parts.py ``ahead_overlap`` against
``ahead``; the same operations, so the same bits)."""


class StageBusy(RuntimeError):
    """The stage already holds the most request caches it may."""


class UnknownRequest(KeyError):
    """A step for a request this stage has no cache for (finished, cancelled, or never started)."""


def prefill_chunk() -> int:
    """Prompt tokens per forward call on this process's device (:data:`PREFILL_CHUNK`, :data:`PREFILL_CHUNK_CPU`)."""
    return PREFILL_CHUNK_CPU if chosen() is DeviceKind.CPU else PREFILL_CHUNK


def prompt_chunks(ids: Sequence[int]) -> list[list[int]]:
    """``ids`` in the chunks every forward call of a prompt takes (see :func:`prefill_chunk`)."""
    size = prefill_chunk()
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


@dataclass
class QueuedStep:
    """A greedy decode step queued on the device before its input token was read (see :meth:`pick_ahead`)."""

    token_in: int  # the token it consumes; its cache entry is already written
    token_out: mx.array  # the token it yields, still computing


@dataclass
class QueuedRows:
    """Greedy decode steps of several requests queued as one batched call before their input tokens were read
    (see :meth:`StageCompute.pick_rows_ahead`)."""

    requests: tuple[RequestCache, ...]
    rids: tuple[str, ...]
    tokens_in: tuple[int, ...]  # the tokens they consume, row by row; their cache entries are already written
    tokens_out: mx.array  # ``[rows]``: the tokens they yield, still computing


@dataclass
class PreparedStep:
    """A one-position step whose graph was built before its input came (see :meth:`StageCompute.prepare`)."""

    slot: mx.array  # evaluated, never read until the input is written into its buffer
    result: mx.array  # the step's output (the last position's logits on the last stage), not evaluated


@dataclass
class RequestCache:
    cache: list[KVCache]
    params: SamplingParams
    started: float = field(default_factory=time.perf_counter)
    tokens_in: int = 0
    queued: QueuedStep | None = None
    prepared: PreparedStep | None = None
    generated: list[int] = field(default_factory=list)  # the completion's tokens so far (penalties look back)
    constraint: Constraint | None = None  # the request's grammar, when it has one
    slot: int | None = None  # its caches' slot of the stage's shared buffers (``--batch fast``), if any


@dataclass
class ComputeStats:
    forward_calls: int = 0
    tokens_forwarded: int = 0
    forward_seconds: float = 0.0
    requests_opened: int = 0
    requests_closed: int = 0
    steps_ahead: int = 0  # greedy steps that were already queued when their token came (pick_ahead)
    steps_undone: int = 0  # queued steps undone because another token came
    rows_ahead: int = 0  # batched greedy steps already queued when their rows' tokens came (pick_rows_ahead)
    rows_undone: int = 0  # ... undone because other rows or tokens came
    steps_prepared: int = 0  # one-position steps built before their input came (prepare)
    prepared_used: int = 0  # ... whose input then came and ran through the built graph
    prepared_undone: int = 0  # ... undone because another kind of step (or none) came
    prepare_seconds: float = 0.0
    batched_calls: int = 0  # forward calls over several requests' rows (forward_batch)
    batched_rows: int = 0  # ... and the rows they carried
    shared_calls: int = 0  # ... whose rows all held slots of the shared buffers (one attention call a layer)


class StageCompute:
    """A shard plus per-request KV caches. Not thread-safe: call only from the owning MLX thread."""

    def __init__(
        self,
        source: ModelSource,
        layers: LayerRange,
        dtype: Dtype,
        *,
        max_requests: int = 16,
        batch: BatchMode = BatchMode.EXACT,
        batch_limit: int = 16,
        keep: StageCompute | None = None,
    ) -> None:
        self.source = source
        self.batch_mode = batch
        self.requested_batch_limit = batch_limit
        self.batch_limit = 1  # rows per forward call; set by load() from the backend (see batching.batch_limit)
        self.layers = layers
        self.dtype = dtype
        self.max_requests = max_requests
        self.model: ShardModel | None = None
        self.requests: dict[str, RequestCache] = {}
        self.stats = ComputeStats()
        self._arena: SlotArena | None = None  # the batched requests' cache buffers, under --batch fast
        self._rows_queued: QueuedRows | None = None  # a batched greedy step queued ahead (pick_rows_ahead)
        # The stage this one replaces on the node: its built layers are taken over at load (same dtype only).
        self._keep = keep.model if keep is not None and keep.dtype == dtype and keep.source is source else None

    def load(self) -> float:
        """Build the shard (only its layers are kept); returns seconds taken. Layers the replaced stage
        (``keep``) had built are taken over, not read again."""
        started = time.perf_counter()
        activate(chosen())
        keep, self._keep = self._keep, None
        self.model = self.source.load_shard(self.layers, self.dtype, keep=keep)
        self.source.release_weights()
        self.batch_limit = 1
        self._arena = None
        if self.model.batchable and self.batch_mode is BatchMode.FAST:
            self.batch_limit = max(1, self.requested_batch_limit)
            if self.batch_limit > 1 and SHARED_SLOTS:
                width = self.layers.end - self.layers.start
                self._arena = SlotArena(width, min(self.batch_limit, self.max_requests))
        elif self.model.batchable and self.batch_mode is BatchMode.EXACT:
            self.batch_limit = exact_limit(self.probe_rows(self.requested_batch_limit))
            mx.clear_cache()  # the probe's scratch buffers would stay in MLX's buffer cache (30 MB, SmolLM2)
        return time.perf_counter() - started

    def _model(self) -> ShardModel:
        if self.model is None:
            raise RuntimeError("stage not loaded")
        return self.model

    def open(self, rid: str, params: SamplingParams, history: Sequence[int] = ()) -> None:
        """``history``: the completion's tokens already generated (a replay), which the penalties look back on."""
        if rid in self.requests:
            return
        if len(self.requests) >= self.max_requests:
            raise StageBusy(f"stage {self.layers} already holds {self.max_requests} requests")
        constraint = Constraint(params.grammar, self.source.tokenizer) if params.grammar else None
        self.requests[rid] = RequestCache(
            self._model().make_cache(), params, generated=list(history), constraint=constraint
        )
        self.stats.requests_opened += 1

    def close(self, rid: str) -> bool:
        request = self.requests.pop(rid, None)
        if request is None:
            return False
        self._drop_queued(request)
        if request.slot is not None and self._arena is not None:
            self._arena.give(request.slot)
        self.stats.requests_closed += 1
        return True

    def kv_cache_bytes(self) -> int:
        """Bytes the open requests' KV caches hold. Safe from any thread: it reads array sizes (shape and
        dtype), evaluates nothing, and copies the request table before walking it. Under ``--batch fast``
        the shared buffers count whole (every slot, held or free) once a request holds a slot."""
        requests = list(self.requests.values())
        own = sum(int(c.nbytes) for r in requests if r.slot is None for c in r.cache)
        arena = self._arena
        shared = arena.nbytes() if arena is not None and any(r.slot is not None for r in requests) else 0
        return own + shared

    def forward(self, rid: str, x: mx.array) -> mx.array:
        """One forward call: token ids ``[1, L]`` (first stage) or hidden states ``[1, L, H]`` in.

        Returns hidden states (evaluated) or, on the last stage, the last position's logits ``[V]``.
        """
        request = self.requests.get(rid)
        if request is None:
            raise UnknownRequest(rid)
        self._drop_queued(request)
        self._drop_prepared(request)
        started = time.perf_counter()
        out = self._model()(x, request.cache)
        result = out[0, -1, :] if self.layers.is_last else out
        mx.eval(result)
        self._count(request, int(x.shape[1]), started)
        return result

    def begin(self, rid: str, x: mx.array, *, logits: bool = True) -> SlicedForward:
        """:meth:`forward`, built now and evaluated later a few layers at a time (:mod:`exo_stable.engine.slicing`):
        the same operations, so its result is the same to the bit. The request's cache takes the call's
        positions now (lazily); nothing else may run on this request until the call is finished.
        ``logits=False`` (the last stage): only the cache entries are wanted (a prompt chunk before the
        last), so the final norm and the head over every position are never computed."""
        request = self.requests.get(rid)
        if request is None:
            raise UnknownRequest(rid)
        self._drop_queued(request)
        self._drop_prepared(request)
        layers: list[mx.array] = []
        out = self._model()(x, request.cache, record=layers)
        positions = int(x.shape[1])

        def done(seconds: float) -> None:
            self._count(request, positions, time.perf_counter() - seconds)

        wanted = out if not self.layers.is_last else out[0, -1, :] if logits else None
        return SlicedForward(layers, wanted, positions, done)

    def forward_batch(self, rids: Sequence[str], xs: Sequence[mx.array]) -> list[mx.array]:
        """One decode step for several open requests: ``xs[i]`` is request ``rids[i]``'s ``[1, 1]`` token id
        (first stage) or ``[1, 1, H]`` hidden state. Each request's cache advances by one position and each
        result is what :meth:`forward` would have returned for that request alone (evaluated).

        Rows go through one forward call, at most :attr:`batch_limit` at a time (see
        :mod:`exo_stable.engine.batching`); with a limit of 1 (batching off, or not exact on this backend
        and dtype, or a model with sliding-window layers) each row is a lone :meth:`forward`."""
        if len(rids) != len(xs):
            raise ValueError(f"{len(rids)} requests for {len(xs)} inputs")
        if len(set(rids)) != len(rids):
            raise ValueError("a request appears twice in one batch")
        requests = []
        for rid in rids:
            request = self.requests.get(rid)
            if request is None:
                raise UnknownRequest(rid)
            requests.append(request)
        if any(x.shape[:2] != (1, 1) for x in xs):
            raise ValueError("a batched step takes one position per request")
        if self.batch_limit == 1 or len(rids) == 1:
            return [self.forward(rid, x) for rid, x in zip(rids, xs, strict=True)]
        out: list[mx.array] = []
        for start in range(0, len(rids), self.batch_limit):
            part = slice(start, start + self.batch_limit)
            if len(rids[part]) == 1:
                out.append(self.forward(rids[start], xs[start]))
            else:
                out += self._forward_rows(requests[part], xs[part])
        return out

    def _forward_rows(self, requests: Sequence[RequestCache], xs: Sequence[mx.array]) -> list[mx.array]:
        started = time.perf_counter()
        out = self._rows_call(requests, mx.concatenate(list(xs), axis=0))
        rows = [out[i, -1, :] if self.layers.is_last else out[i : i + 1] for i in range(len(requests))]
        mx.eval(rows)
        self.stats.forward_seconds += time.perf_counter() - started
        return rows

    def _rows_call(self, requests: Sequence[RequestCache], x: mx.array, *, overlap: bool = True) -> mx.array:
        """The batched forward call over ``requests``' next positions (``x``: ``[rows, 1]`` token ids or
        ``[rows, 1, H]`` hidden states), built and not evaluated; each row's cache takes its position.
        ``overlap``: start its evaluation every few layers while building (see :data:`QUEUED_OVERLAP`)."""
        for request in requests:
            self._drop_queued(request)
            self._drop_prepared(request)
            if self._arena is not None and request.slot is None and request.cache[0].offset > 0:
                slot = self._arena.take()  # its first shared step: it moves into a free slot, if one is
                if slot is not None:
                    request.cache, request.slot = self._arena.move_in(request.cache, slot), slot
        out = self._model().forward_rows(x, [r.cache for r in requests], overlap=overlap)
        self.stats.forward_calls += 1
        self.stats.batched_calls += 1
        self.stats.batched_rows += len(requests)
        self.stats.shared_calls += all(r.slot is not None for r in requests)
        self.stats.tokens_forwarded += len(requests)
        for request in requests:
            request.tokens_in += 1
        return out

    def probe_rows(self, most: int) -> dict[int, bool]:
        """For each batch size 2..``most``: does every matrix product of the shard give each row of a batch
        the bits it gives that row alone? (The rest of a batched step is row-wise by construction, see
        :mod:`exo_stable.engine.batching`.)

        That depends on the backend, the dtype and the matrices' shapes (a BLAS picks its blocking from
        them), not on the values: so each distinct product of the loaded shard runs on random rows, alone and
        at every batch size."""
        model = self._model()
        if most < 2 or not model.batchable:
            return {}
        return probe_products(model.net, head=self.layers.is_last, dtype=compute_dtype(self.dtype), most=most)

    def _count(self, request: RequestCache, tokens: int, started: float) -> None:
        """Book a forward call of ``tokens`` positions that began at ``started``."""
        self.stats.forward_calls += 1
        self.stats.tokens_forwarded += tokens
        self.stats.forward_seconds += time.perf_counter() - started
        request.tokens_in += tokens

    def forward_input(self, rid: str, tokens: Sequence[int], tensor: WireTensor | None = None) -> mx.array:
        """:meth:`forward` from the input as it came: token ids (first stage) or an activation's exact bytes.

        A one-position input for which :meth:`prepare` built the graph is written into that graph's slot and
        evaluated; any other input undoes the prepared step and takes the ordinary path. Either way the same
        operations run on the same values, so the result is the same to the bit.
        """
        request = self.requests.get(rid)
        if request is None:
            raise UnknownRequest(rid)
        prepared = request.prepared
        if prepared is not None and fill_input(prepared.slot, tokens, tensor):
            request.prepared = None
            started = time.perf_counter()
            mx.eval(prepared.result)
            self.stats.prepared_used += 1
            self._count(request, 1, started)
            return prepared.result
        return self.forward(rid, input_array(tokens, tensor))

    def prepare(self, rid: str) -> bool:
        """Build the graph of the request's next one-position step before its input is known.

        The graph reads an evaluated placeholder (a token id on the first stage, a hidden state elsewhere)
        that :meth:`forward_input` fills in place when the input comes, so a stage does its graph building
        while the other stages compute instead of after. Nothing starts on the device here (the input is not
        there yet). The step's cache entry is already written, lazily: a step that does not come is undone
        by trimming it. Returns whether a step was prepared (not when one is already prepared or queued).
        """
        request = self.requests.get(rid)
        if request is None:
            raise UnknownRequest(rid)
        queued = request.queued is not None or self._in_queued_rows(request)
        if request.prepared is not None or queued or request.slot is not None:
            # (A slot shares its layer's buffer with other requests: a graph built on a placeholder would
            # write there before its input is known, and another request's step could evaluate it first.)
            return False
        started = time.perf_counter()
        model = self._model()
        if self.layers.is_first:
            slot = mx.zeros((1, 1), dtype=mx.int32)
            x = slot
        else:
            act = compute_dtype(self.dtype)
            slot = mx.zeros((1, 1, model.spec.hidden_size), dtype=mx.uint16 if act == mx.bfloat16 else act)
            x = slot.view(mx.bfloat16) if act == mx.bfloat16 else slot
        mx.eval(slot)  # the slot's buffer must exist before the input is written into it
        out = model(x, request.cache, overlap=False)
        request.prepared = PreparedStep(slot, out[0, -1, :] if self.layers.is_last else out)
        self.stats.steps_prepared += 1
        self.stats.prepare_seconds += time.perf_counter() - started
        return True

    def pick_ahead(self, rid: str, tokens: Sequence[int], *, queue_next: bool) -> int:
        """A greedy step of a whole-model shard (a one-stage plan): ``tokens`` in, the picked token out, with
        the step fed by that token queued on the device before it is read (``queue_next``).

        The next call normally brings exactly that token: its step is then already computing, and the device
        works on it while the host sends the token round. A call that brings another token (a replay feeding
        the one its client already has) undoes the queued step first. The operations are those of
        :meth:`forward` and :meth:`pick`, so the tokens are the same; only the waiting moves.
        """
        request = self.requests.get(rid)
        if request is None:
            raise UnknownRequest(rid)
        if not request.params.plain_greedy:
            raise ValueError("decoding ahead needs a plain greedy request (no bias, penalties or logprobs)")
        queued = request.queued
        if queued is not None and len(tokens) == 1 and tokens[0] == queued.token_in:
            request.queued = None
            token = queued.token_out
            self.stats.steps_ahead += 1
        else:
            token = mx.argmax(self.forward(rid, input_array(tokens)))
        if queue_next:
            following = self.decode_ahead(rid, token)
        picked = int(token.item())  # type: ignore[arg-type]
        if queue_next:
            request.queued = QueuedStep(picked, following)
        return picked

    def _drop_queued(self, request: RequestCache) -> None:
        """Undo a queued step that the next call does not use (its cache entry goes; its result is dropped):
        the request's own, or the queued batched step it has a row in (every row of it)."""
        if self._in_queued_rows(request):
            self._drop_rows()
        if request.queued is not None:
            request.queued = None
            self.stats.steps_undone += 1
            for layer_cache in request.cache:
                layer_cache.trim(1)
            request.tokens_in -= 1

    def _drop_prepared(self, request: RequestCache) -> None:
        """Undo a prepared step that the next call does not use: its (lazy) cache entry is trimmed, and the
        graph, never evaluated, goes."""
        if request.prepared is not None:
            request.prepared = None
            self.stats.prepared_undone += 1
            for layer_cache in request.cache:
                layer_cache.trim(1)

    def rewind(self, rid: str, tokens: int) -> None:
        """Undo the cache side of the last forward call, of ``tokens`` positions, so that the same call can
        run again on the same cache state (a spot check recomputes a step and compares bit for bit)."""
        request = self.requests.get(rid)
        if request is None:
            raise UnknownRequest(rid)
        self._drop_queued(request)
        self._drop_prepared(request)
        for layer_cache in request.cache:
            layer_cache.trim(tokens)
        request.tokens_in -= tokens

    def pick(self, rid: str, logits: mx.array, position: int) -> int:
        """The token at generated ``position`` from the last position's logits (last stage only)."""
        return self.choose(rid, logits, position).token

    def choose(
        self, rid: str, logits: mx.array, position: int, forced: int | None = None, *, top: int | None = None
    ) -> Pick:
        """:meth:`pick` with the log-probabilities the request asked for. The penalties look back on the
        completion's tokens before ``position``; the token taken there (``forced``, a replay's known token, or
        the pick) is recorded for the positions after it. ``top``: the row's argmax, when :meth:`greedy_tops`
        computed it with other rows'."""
        request = self.requests[rid]
        params = request.params
        if params.plain_greedy:
            chosen = Pick(top if top is not None else int(mx.argmax(logits).item()))  # type: ignore[arg-type]
        else:
            row = np.array(logits.astype(mx.float32), copy=False)
            previous = request.generated[:position]
            allowed = None if request.constraint is None else request.constraint.allowed(previous, row.shape[0])
            chosen = sample_pick(row, params, position, previous, allowed)
        self._record(request, position, chosen.token if forced is None else forced)
        return chosen

    def greedy_tops(self, rids: Sequence[str], rows: Sequence[mx.array]) -> list[int | None]:
        """The argmax of each plain-greedy request's logits row, all in one operation and one read from the
        device (a row's argmax is the same whether taken alone or beside others); None for the other rows."""
        greedy = [i for i, rid in enumerate(rids) if (r := self.requests.get(rid)) and r.params.plain_greedy]
        tops: list[int | None] = [None] * len(rids)
        if len(greedy) > 1:
            found = np.array(mx.argmax(mx.stack([rows[i] for i in greedy]), axis=-1))
            for i, token in zip(greedy, found.tolist(), strict=True):
                tops[i] = int(token)
        return tops

    @staticmethod
    def _record(request: RequestCache, position: int, token: int) -> None:
        if request.params.needs_history:
            del request.generated[position:]
            if len(request.generated) == position:
                request.generated.append(token)

    def prefill_local(self, rid: str, prompt: Sequence[int]) -> int:
        """The whole prompt through a single-stage (whole-model) shard; returns the first token."""
        return self.prefill_pick(rid, prompt, 0).token

    def decode_local(self, rid: str, token: int, position: int) -> int:
        """One decode step on a whole-model shard: ``token`` in, the token at ``position`` out."""
        return self.decode_pick(rid, token, position).token

    def prefill_pick(self, rid: str, ids: Sequence[int], position: int) -> Pick:
        """``ids`` through a whole-model shard in prompt chunks; the token at ``position`` (with logprobs)."""
        logits: mx.array | None = None
        for chunk in prompt_chunks(ids):
            logits = self.forward(rid, mx.array([chunk], dtype=mx.int32))
        assert logits is not None, "empty prompt"
        return self.choose(rid, logits, position)

    def decode_pick(self, rid: str, token: int, position: int) -> Pick:
        """One decode step on a whole-model shard: ``token`` (the one at ``position - 1``) in, the pick out."""
        request = self.requests.get(rid)
        if request is None:
            raise UnknownRequest(rid)
        self._record(request, position - 1, token)
        return self.choose(rid, self.forward(rid, mx.array([[token]], dtype=mx.int32)), position)

    def decode_batch(self, rids: Sequence[str], tokens: Sequence[int], positions: Sequence[int]) -> list[Pick]:
        """:meth:`decode_pick` for several requests in one forward call (see :meth:`forward_batch`)."""
        for rid, token, position in zip(rids, tokens, positions, strict=True):
            request = self.requests.get(rid)
            if request is None:
                raise UnknownRequest(rid)
            self._record(request, position - 1, token)
        xs = [mx.array([[token]], dtype=mx.int32) for token in tokens]
        rows = self.forward_batch(rids, xs)
        tops = self.greedy_tops(rids, rows)
        return [
            self.choose(rid, row, position, top=top)
            for rid, row, position, top in zip(rids, rows, positions, tops, strict=True)
        ]

    # ---- greedy decoding one step ahead (the single device's fast path) -----------------------------------

    def prefill_ahead(self, rid: str, prompt: Sequence[int]) -> mx.array:
        """The prompt through a whole-model shard; the first greedy token comes back unevaluated (queued)."""
        logits: mx.array | None = None
        for chunk in prompt_chunks(prompt):
            logits = self.forward(rid, mx.array([chunk], dtype=mx.int32))
        assert logits is not None, "empty prompt"
        token = mx.argmax(logits)
        mx.async_eval(token)  # type: ignore[no-untyped-call]
        return token

    def decode_ahead(self, rid: str, token: mx.array) -> mx.array:
        """Queue the greedy decode step fed by ``token``, which may itself still be computing.

        Nothing waits here: the device works on this step while the caller reads the previous token, builds
        the next graph and hands the token on. The operations are those of :meth:`decode_local`, so the
        tokens are the same; only the waiting moves.
        """
        request = self.requests.get(rid)
        if request is None:
            raise UnknownRequest(rid)
        if self._in_queued_rows(request):
            self._drop_rows()
        self._drop_prepared(request)
        out = self._model()(token.reshape(1, 1), request.cache, overlap=QUEUED_OVERLAP)
        nxt = mx.argmax(out[0, -1, :])
        mx.async_eval(nxt)  # type: ignore[no-untyped-call]
        self.stats.forward_calls += 1
        self.stats.tokens_forwarded += 1
        request.tokens_in += 1
        return nxt

    def pick_rows_ahead(self, rids: Sequence[str], tokens: Sequence[int], follow: Sequence[int]) -> list[int]:
        """Greedy decode steps of several plain-greedy requests as one batched call of a whole-model shard
        (a one-stage plan): ``tokens`` in, each row's pick out, with the batched step of the rows ``follow``
        (indices into ``rids``; two or more, else none is queued) fed by those picks queued on the device
        before the picks are read.

        The next call normally brings exactly those rows and tokens: its step is then already computing, so
        the device works on it while the host hands the tokens out and builds the step after it. A call that
        brings other rows (a request joined, left or paused) or other tokens undoes the queued step first,
        trimming each of its rows' caches by the one position it wrote. A step runs the very call
        :meth:`forward_batch` makes for the same rows, and a row's argmax is its own, so the tokens are
        those of :meth:`decode_batch`; only the waiting moves."""
        if not 2 <= len(rids) <= self.batch_limit or len(tokens) != len(rids):
            most = self.batch_limit
            raise ValueError(f"{len(rids)} rows for {len(tokens)} tokens (a batched step takes 2 to {most} rows)")
        requests = []
        for rid in rids:
            request = self.requests.get(rid)
            if request is None:
                raise UnknownRequest(rid)
            if not request.params.plain_greedy:
                raise ValueError("decoding ahead needs plain greedy requests (no bias, penalties or logprobs)")
            requests.append(request)
        started = time.perf_counter()
        queued = self._rows_queued
        if queued is not None and queued.rids == tuple(rids) and queued.tokens_in == tuple(tokens):
            self._rows_queued = None
            picks = queued.tokens_out
            self.stats.rows_ahead += 1
        else:
            self._drop_rows()
            x = mx.array(list(tokens), dtype=mx.int32).reshape(len(tokens), 1)
            picks = mx.argmax(self._rows_call(requests, x)[:, -1, :], axis=-1)
        queue = len(follow) >= 2
        if queue:
            rows = [requests[i] for i in follow]
            x = (picks if len(follow) == len(rids) else picks[mx.array(list(follow))]).reshape(len(follow), 1)
            out = mx.argmax(self._rows_call(rows, x, overlap=QUEUED_OVERLAP)[:, -1, :], axis=-1)
            mx.async_eval(out)  # type: ignore[no-untyped-call]
        picked: list[int] = picks.tolist()  # type: ignore[assignment]
        if queue:
            fed = tuple(picked[i] for i in follow)
            self._rows_queued = QueuedRows(tuple(rows), tuple(rids[i] for i in follow), fed, out)
        self.stats.forward_seconds += time.perf_counter() - started
        return picked

    def queued_rows(self) -> tuple[str, ...]:
        """The requests of the batched step queued ahead, in its row order (empty when none is)."""
        return () if self._rows_queued is None else self._rows_queued.rids

    def settle(self) -> float:
        """Wait for any step queued ahead to finish computing (it stays queued); the seconds waited. Work timed
        after this (a prompt chunk's slice) then measures itself, not the queued step."""
        started = time.perf_counter()
        pending = [r.queued.token_out for r in self.requests.values() if r.queued is not None]
        if self._rows_queued is not None:
            pending.append(self._rows_queued.tokens_out)
        if pending:
            mx.eval(pending)
        return time.perf_counter() - started

    def _in_queued_rows(self, request: RequestCache) -> bool:
        batch = self._rows_queued
        return batch is not None and any(r is request for r in batch.requests)

    def _drop_rows(self) -> None:
        """Undo the queued batched step, if any: each of its rows' caches gives back the position it wrote."""
        batch, self._rows_queued = self._rows_queued, None
        if batch is None:
            return
        self.stats.rows_undone += 1
        for request in batch.requests:
            for layer_cache in request.cache:
                layer_cache.trim(1)
            request.tokens_in -= 1

    def logits_all(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position in one uncached pass (teacher forcing; whole-model shards only)."""
        model = self._model()
        out = model(mx.array([list(ids)], dtype=mx.int32), model.make_cache())
        return np.array(out[0].astype(mx.float32))
