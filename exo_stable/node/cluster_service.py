"""The API's backend on a cluster node: :class:`ClusterService` runs each request on the committed plan
through the node's :class:`~exo_stable.pipeline.owner.PipelineOwner`, and answers the API's health, KV and
availability questions from the node's coordinator, stage host and peer links.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from exo_stable.engine.loader import ModelSource
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.textstream import Delta
from exo_stable.node.parts import NodeParts
from exo_stable.pipeline.service import GenerationJob, Service
from exo_stable.pipeline.statistics import NodeStatistics
from exo_stable.pipeline.trace import RequestTrace


class ClusterService(Service):
    """The API's backend on a node: requests run on the cluster's committed plan."""

    backend = "pipeline"

    def __init__(
        self,
        parts: NodeParts,
        source: ModelSource,
        *,
        context_length: int,
        dtype: Dtype,
        statistics: Callable[[], NodeStatistics],
        max_active: int,
        max_queue: int = 32,
    ) -> None:
        """``statistics``: the node's snapshot, which ``/health`` shows beside the service's own."""
        super().__init__(
            source.tokenizer,
            model_name=source.name,
            context_length=context_length,
            dtype=str(dtype),
            max_active=max_active,
            max_queue=max_queue,
        )
        self.parts = parts
        self.node_statistics = statistics

    async def stream(self, job: GenerationJob, trace: RequestTrace | None = None) -> AsyncGenerator[Delta]:
        self.requests_started += 1
        links_before = self._link_counters()
        generated = 0
        try:
            async with aclosing(self.parts.owner.stream(job, trace)) as deltas:
                async for delta in deltas:
                    generated = delta.completion_tokens
                    yield delta
        finally:
            self.generated_tokens += generated
            if trace is not None:
                # Link counters are per link, not per request: what moved while this request ran.
                for peer, (retransmits, corrupt) in self._link_counters().items():
                    before = links_before.get(peer, (0, 0))
                    if (retransmits - before[0]) or (corrupt - before[1]):
                        trace.event(
                            "links", peer=peer, retransmits=retransmits - before[0], corrupt_frames=corrupt - before[1]
                        )

    def _link_counters(self) -> dict[str, tuple[int, int]]:
        """(retransmissions, corrupt frames) summed over both links to each peer."""
        out: dict[str, tuple[int, int]] = {}
        for peer, _, st in self.parts.peers.statistics().links():
            r, c = out.get(peer, (0, 0))
            out[peer] = (r + st.retransmissions, c + st.corrupt_frames)
        return out

    def kv_cache_bytes(self) -> int | None:
        actor = self.parts.stage_host.actor
        return None if actor is None else actor.kv_cache_bytes()

    def unavailable(self) -> str | None:
        coordinator = self.parts.coordinator
        if coordinator.active is None:
            why = coordinator.infeasible()
            if why is not None:
                return f"the cluster has no pipeline plan: {why}\nwaiting for more nodes (or more memory) to join"
            return "the cluster has no pipeline plan yet (the model is loading or peers are joining)"
        return None

    def health(self) -> dict[str, Any]:
        return super().health() | self.node_statistics().as_dict()
