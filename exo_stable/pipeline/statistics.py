"""A node's statistics as one typed snapshot: :class:`NodeStatistics`, assembled by the node from each
component's own ``statistics()`` (peers and links from ``wire``, the stage, the owner, its validation and
recoveries from ``pipeline``, membership and plans as :class:`ClusterStatistics`).

``/health``, ``/metrics`` and ``/v1/cluster`` read this one snapshot (through a callable they are given),
never the node's objects, so the API layer knows nothing of how a node is built. Pure data, no IO.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exo_stable.pipeline.ownerstate import OwnerStatistics
from exo_stable.pipeline.stagestate import StageStatistics
from exo_stable.wire.linkconfig import PeersStatistics
from exo_stable.wire.messages import PlanCommit, SyncState


@dataclass(frozen=True, slots=True)
class ClusterStatistics:
    """The coordinator's view: the committed plan, the members, the suspects, the peers it refused."""

    plan: PlanCommit | None
    membership_epoch: int
    members: frozenset[str]
    suspects: frozenset[str] = frozenset()
    refused: Mapping[str, str] = field(default_factory=dict)
    """Peers that are not members (another model or protocol), with the reason."""
    barrier: SyncState | None = None
    """The barrier of the plan round this node leads, while one is open (None otherwise)."""


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """Everything a node reports, taken at one moment (``Node.statistics()``)."""

    node_id: str
    cluster: ClusterStatistics
    peers: PeersStatistics
    owner: OwnerStatistics
    stage: StageStatistics | None = None
    refusals: Mapping[str, int] = field(default_factory=dict)
    """Peer messages refused because the sender lacked the role, by kind (cluster/roles.py)."""
    escalations: int = 0
    stage_restarts: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The node's part of ``/health``."""
        plan = self.cluster.plan
        return {
            "node_id": self.node_id,
            "plan_epoch": None if plan is None else plan.epoch,
            "membership_epoch": self.cluster.membership_epoch,
            "plan_barrier": None if (b := self.cluster.barrier) is None else _barrier(b),
            "stage": None if self.stage is None else self.stage.as_dict(),
            "owner": self.owner.as_dict(),
            "peers": self.peers.as_dict(),
            "supervision": {
                "escalations": self.escalations,
                "stage_restarts": self.stage_restarts,
                "suspects": sorted(self.cluster.suspects),
            },
        }


def _barrier(state: SyncState) -> dict[str, Any]:
    return {
        "name": state.barrier_name,
        "status": state.barrier_status.value,
        "devices": list(state.participating_devices),
        "timeout_remaining_s": round(state.timeout_remaining, 3),
    }


__all__ = ["ClusterStatistics", "NodeStatistics"]
