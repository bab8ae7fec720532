"""The components of a running node (:class:`NodeParts`), as :meth:`~exo_stable.node.node.Node.assemble`
builds them: what the node's loops run and what its API backend (:mod:`~exo_stable.node.cluster_service`)
asks."""

from __future__ import annotations

from dataclasses import dataclass

from exo_stable.cluster.coordinator import Coordinator
from exo_stable.cluster.gossip import Gossip
from exo_stable.cluster.peers import PeerManager
from exo_stable.cluster.router import MessageRouter
from exo_stable.cluster.stagehost import StageHost
from exo_stable.pipeline.barrier import Barriers
from exo_stable.pipeline.fallback import FallbackCoordinator
from exo_stable.pipeline.owner import PipelineOwner


@dataclass(frozen=True, slots=True)
class NodeParts:
    """A running node's components, built once by :meth:`Node.assemble` in dependency order."""

    peers: PeerManager
    barriers: Barriers
    stage_host: StageHost
    coordinator: Coordinator
    fallback: FallbackCoordinator
    owner: PipelineOwner
    gossip: Gossip
    router: MessageRouter
