"""The API's backend on a cluster node: :class:`ClusterService` runs each request on the committed plan
through the node's :class:`~exo_stable.pipeline.owner.PipelineOwner`, and answers the API's health, KV and
availability questions from the node's coordinator, stage host and peer links.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from exo_stable.engine.textstream import Delta
from exo_stable.pipeline.service import GenerationJob, GenerationResult, Service

if TYPE_CHECKING:
    from exo_stable.node.node import Node


class ClusterService(Service):
    """The API's backend on a node: requests run on the cluster's committed plan."""

    backend = "pipeline"

    def __init__(self, node: Node, *, max_active: int, max_queue: int = 32) -> None:
        source = node.source
        super().__init__(
            source.tokenizer,
            model_name=source.name,
            context_length=node.context_length,
            dtype=str(node.config.dtype),
            max_active=max_active,
            max_queue=max_queue,
        )
        self.node = node

    async def stream(self, job: GenerationJob, result: GenerationResult) -> AsyncGenerator[Delta]:
        self.requests_started += 1
        links_before = self._link_counters()
        try:
            async with aclosing(self.node.owner.stream(job, result)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            self.generated_tokens += result.completion_tokens
            if result.trace is not None:
                # Link counters are per link, not per request: what moved while this request ran.
                for peer, (retransmits, corrupt) in self._link_counters().items():
                    before = links_before.get(peer, (0, 0))
                    if (retransmits - before[0]) or (corrupt - before[1]):
                        result.trace.event(
                            "links", peer=peer, retransmits=retransmits - before[0], corrupt_frames=corrupt - before[1]
                        )

    def _link_counters(self) -> dict[str, tuple[int, int]]:
        """(retransmissions, corrupt frames) summed over both links to each peer."""
        out: dict[str, tuple[int, int]] = {}
        for peer, _, st in self.node.peers.link_statistics():
            r, c = out.get(peer, (0, 0))
            out[peer] = (r + st.retransmissions, c + st.corrupt_frames)
        return out

    def kv_cache_bytes(self) -> int | None:
        actor = self.node.stage_host.actor
        return None if actor is None else actor.kv_cache_bytes()

    def unavailable(self) -> str | None:
        coordinator = self.node.coordinator
        if coordinator.active is None:
            why = coordinator.infeasible()
            if why is not None:
                return f"the cluster has no pipeline plan: {why}\nwaiting for more nodes (or more memory) to join"
            return "the cluster has no pipeline plan yet (the model is loading or peers are joining)"
        return None

    def health(self) -> dict[str, Any]:
        body = super().health()
        plan = self.node.coordinator.active
        body |= {
            "node_id": self.node.node_id,
            "plan_epoch": None if plan is None else plan.epoch,
            "membership_epoch": self.node.coordinator.membership_epoch,
            "stage": self.node.stage_host.snapshot(),
            "owner": self.node.owner.snapshot(),
            "peers": self.node.peers.statistics(),
            "supervision": {
                "escalations": self.node.escalations,
                "stage_restarts": self.node.stage_host.restarts,
                "suspects": sorted(self.node.coordinator.active_suspects()),
            },
        }
        return body
