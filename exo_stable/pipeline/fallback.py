"""FallbackCoordinator: when no pipeline plan fits the surviving nodes, run a request on this node alone.

The catastrophic case of recovery: nodes are gone (or suspect) and the ones left cannot split the model
between them (a forced split waits for more nodes, or their memory is too small for any placement). The
request's owner then asks this coordinator, which holds the whole model on one dedicated MLX thread (the
single-device path: the same :class:`StageCompute` over every layer that a one-node pipeline and the
single-device engine use) when this node's memory holds it, and either replays the request on it and
continues, or says plainly why it cannot (the owner ends the stream with that error, never a hang).

The whole model is loaded on first use, once, and kept for later fallbacks (a deadline bounds the load).
A replay follows the request's :class:`ReplayMode`: ``exact`` re-runs the prompt chunks and then every
generated token one decode step each (the continuation is bit-identical to the uninterrupted run), ``fast``
re-prefills prompt and generated tokens in the chunks of any prompt (:func:`prompt_chunks`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace

from exo_stable.engine.loader import ModelSource
from exo_stable.engine.mlx_thread import MlxThread
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import Pick, SamplingParams
from exo_stable.engine.stagecompute import StageCompute
from exo_stable.pipeline.placement import ModelFootprint, footprint_from_spec
from exo_stable.pipeline.recovery import ReplayMode

log = logging.getLogger(__name__)


class FallbackUnavailable(RuntimeError):
    """This node cannot run the whole model (not enough memory, or it failed to load)."""


@dataclass
class FallbackStats:
    requests: int = 0
    tokens: int = 0
    replayed_tokens: int = 0
    refused: int = 0
    load_s: float | None = None


@dataclass(frozen=True, slots=True)
class FallbackStatistics:
    """Whether this node could run the whole model now, whether it holds it, and what it served so."""

    available: bool
    loaded: bool
    needed_bytes: int
    counters: FallbackStats

    def as_dict(self) -> dict[str, object]:
        st = self.counters
        return {
            "available": self.available,
            "loaded": self.loaded,
            "needed_mib": round(self.needed_bytes / 2**20, 1),
            "requests": st.requests,
            "tokens": st.tokens,
            "replayed_tokens": st.replayed_tokens,
            "refused": st.refused,
            "load_s": None if st.load_s is None else round(st.load_s, 3),
        }


class FallbackCoordinator:
    """The single-device fallback of one node; see the module docstring."""

    def __init__(
        self,
        source: ModelSource,
        *,
        node_id: str,
        dtype: Dtype,
        memory_bytes: int,
        bytes_per_param: float,
        footprint: ModelFootprint | None = None,
        max_requests: int = 8,
        load_timeout_s: float = 600.0,
        step_timeout_s: float = 120.0,
    ) -> None:
        self.source = source
        self.node_id = node_id
        self.dtype = dtype
        self.memory_bytes = memory_bytes
        n = source.spec.num_hidden_layers
        whole = footprint or footprint_from_spec(source.spec, bytes_per_param)
        self.needed_bytes = whole.stage_bytes(0, 1, n)
        self.max_requests = max_requests
        self.load_timeout_s = load_timeout_s
        self.step_timeout_s = step_timeout_s
        self.stats = FallbackStats()
        self._layers = LayerRange(0, n, n)
        self._compute: StageCompute | None = None
        self._thread: MlxThread | None = None
        self._lock = asyncio.Lock()

    def unavailable(self) -> str | None:
        """Why this node cannot hold the whole model, or None when it can."""
        if self.memory_bytes < self.needed_bytes:
            return (
                f"node {self.node_id} offers {self.memory_bytes / 2**20:.0f} MiB; the whole model needs "
                f"{self.needed_bytes / 2**20:.0f} MiB"
            )
        return None

    async def _loaded(self) -> tuple[MlxThread, StageCompute]:
        async with self._lock:
            if self._thread is None or self._compute is None:
                thread = MlxThread(f"mlx-fallback-{self.node_id}")
                compute = StageCompute(self.source, self._layers, self.dtype, max_requests=self.max_requests)
                try:
                    self.stats.load_s = await thread.run(compute.load, timeout=self.load_timeout_s)
                except BaseException:
                    thread.close()
                    raise
                log.warning("%s: loaded the whole model for the fallback in %.2fs", self.node_id, self.stats.load_s)
                self._thread, self._compute = thread, compute
            return self._thread, self._compute

    async def generate(
        self,
        rid: str,
        prompt: Sequence[int],
        params: SamplingParams,
        history: Sequence[int],
        *,
        mode: ReplayMode,
        max_tokens: int,
    ) -> AsyncGenerator[tuple[int, Pick]]:
        """Rebuild the request's cache from ``prompt`` and ``history``; yield ``(position, pick)`` from position
        ``len(history)`` on, up to ``max_tokens``. Closing the iterator frees the cache."""
        if (reason := self.unavailable()) is not None:
            self.stats.refused += 1
            raise FallbackUnavailable(reason)
        thread, compute = await self._loaded()
        key = f"fallback-{rid}"
        self.stats.requests += 1
        history = list(history)
        position = len(history)
        await thread.run(compute.open, key, params, history, timeout=self.step_timeout_s)
        try:
            if mode is ReplayMode.FAST or not history:
                token = await thread.run(compute.prefill_pick, key, [*prompt, *history], position, timeout=self._long())
            else:
                token = await thread.run(compute.prefill_pick, key, list(prompt), 0, timeout=self._long())
                for pos in range(1, len(history) + 1):
                    token = await thread.run(
                        compute.decode_pick, key, history[pos - 1], pos, timeout=self.step_timeout_s
                    )
            self.stats.replayed_tokens += len(history)
            while position < max_tokens:
                self.stats.tokens += 1
                yield position, token
                position += 1
                if position >= max_tokens:
                    break
                token = await thread.run(compute.decode_pick, key, token.token, position, timeout=self.step_timeout_s)
        finally:
            if thread.alive:
                thread.submit(compute.close, key, timeout=self.step_timeout_s)

    def _long(self) -> float:
        return self.step_timeout_s * 4

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
            self._thread, self._compute = None, None

    def statistics(self) -> FallbackStatistics:
        return FallbackStatistics(
            available=self.unavailable() is None,
            loaded=self._compute is not None,
            needed_bytes=self.needed_bytes,
            counters=replace(self.stats),
        )

    def snapshot(self) -> dict[str, object]:
        return self.statistics().as_dict()
