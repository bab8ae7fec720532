"""Where a peer's message goes: one table from message type to the component that owns it, behind the role
checks of ``roles.py`` (a non-member is refused everything; a member only what its role lets it send).

- plans and membership (PlanProposal, StageStatus, PlanCommit, SuspectNode): the coordinator;
- the peer directory: gossip;
- barrier arrivals: the node's barriers;
- tokens and stage failures (TokenChunk, StageFailure): the request owner;
- a request's messages to a stage (RequestOpen, StepInput, ActivationChunk, RequestClose, ResendTokens):
  the stage host.

Peers going up or down reach the coordinator, gossip, the owner (its requests on that node recover) and the
stage host (the requests that node owned here close).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from exo_stable.cluster.coordinator import Coordinator
from exo_stable.cluster.gossip import Gossip
from exo_stable.cluster.roles import (
    MAX_DIRECTORY,
    Bounds,
    Refusals,
    activation_refusal,
    request_open_refusal,
    step_refusal,
    token_refusal,
)
from exo_stable.cluster.stagehost import StageHost
from exo_stable.logs import safe
from exo_stable.pipeline.barrier import Barriers
from exo_stable.pipeline.owner import PipelineOwner
from exo_stable.pipeline.ownerstate import NO_STAGE_LOADED, OPEN_WITHOUT_STAGE
from exo_stable.wire.handshake import PeerInfo
from exo_stable.wire.messages import (
    ActivationChunk,
    BarrierArrive,
    Message,
    PeerDirectory,
    PlanCommit,
    PlanProposal,
    RequestClose,
    RequestOpen,
    ResendTokens,
    StageFailure,
    StageRange,
    StageStatus,
    StepInput,
    SuspectNode,
    TokenChunk,
)

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Awaitable[None]]
Send = Callable[[str, Message], Awaitable[None]]


class MessageRouter:
    """Routes each peer message by type to its receiver, once the sender may send it (see the module doc)."""

    def __init__(
        self,
        node_id: str,
        *,
        coordinator: Coordinator,
        stage_host: StageHost,
        owner: PipelineOwner,
        barriers: Barriers,
        gossip: Gossip,
        send: Send,
        refusals: Refusals,
        bounds: Bounds,
        slots_per_owner: int,
    ) -> None:
        self.node_id = node_id
        self.coordinator = coordinator
        self.stage_host = stage_host
        self.owner = owner
        self.barriers = barriers
        self.gossip = gossip
        self.send = send
        self.refusals = refusals
        self.bounds = bounds
        self.slots_per_owner = slots_per_owner
        self.unexpected = 0
        self.routes: dict[type[Message], Handler] = {
            PlanProposal: coordinator.handle,
            StageStatus: coordinator.handle,
            PlanCommit: coordinator.handle,
            SuspectNode: coordinator.handle,
            PeerDirectory: self._directory,
            BarrierArrive: self._barrier,
            TokenChunk: self._owner,
            StageFailure: self._owner,
            RequestOpen: self._open,
            StepInput: self._stage,
            ActivationChunk: self._stage,
            RequestClose: self._stage,
            ResendTokens: self._stage,
        }

    async def dispatch(self, sender: str, message: Message) -> None:
        """Route a peer's message to its receiver if the sender holds the role it needs (cluster/roles.py)."""
        if sender != self.node_id and sender not in self.coordinator.members:
            self.refusals.refuse(sender, "not_a_member", message)
            return
        refusal = self.refusal(sender, message)
        if refusal is not None:
            self.refusals.refuse(sender, refusal, message)
            if isinstance(message, RequestOpen) and sender == message.owner:
                # The owner's request fails now, not at its open deadline.
                no = BarrierArrive(name=message.barrier, member=self.node_id, ok=False, detail=f"refused: {refusal}")
                await self.send(message.owner, no)
            return
        handler = self.routes.get(type(message))
        if handler is None:
            self.unexpected += 1
            log.warning("%s: unexpected %s from %s", self.node_id, type(message).__name__, safe(sender))
            return
        await handler(sender, message)

    def on_membership(self, peer: PeerInfo | str, up: bool) -> None:
        self.coordinator.on_membership(peer, up)
        if up:
            self.gossip.joined()
            return
        node = peer if isinstance(peer, str) else peer.node_id
        self.owner.on_peer_down(node)
        closed = self.stage_host.owner_gone(node)
        if closed:
            log.warning("%s: closed %d requests of %s, which is gone", self.node_id, closed, node)

    # -- receivers -------------------------------------------------------------------------------------

    async def _directory(self, sender: str, message: PeerDirectory) -> None:
        self.gossip.learn(message)

    async def _barrier(self, sender: str, message: BarrierArrive) -> None:
        await self.barriers.arrive(message)

    async def _owner(self, sender: str, message: TokenChunk | StageFailure) -> None:
        self.owner.deliver(message)

    async def _open(self, sender: str, message: RequestOpen) -> None:
        if not await self.stage_host.deliver(message):
            no = BarrierArrive(name=message.barrier, member=self.node_id, ok=False, detail=NO_STAGE_LOADED)
            await self.send(message.owner, no)

    async def _stage(self, sender: str, message: StepInput | ActivationChunk | RequestClose | ResendTokens) -> None:
        if not await self.stage_host.deliver(message):
            self.unexpected += 1

    # -- roles -----------------------------------------------------------------------------------------

    def _plan_stages(self, epoch: int) -> tuple[StageRange, ...] | None:
        plan = self.coordinator.history.plans.get(epoch)
        return plan.stages if plan is not None else self.stage_host.stages_of(epoch)

    def refusal(self, sender: str, message: Message) -> str | None:
        """Why a member's message is not for it to send (cluster/roles.py), or None."""
        host = self.stage_host
        match message:
            case PeerDirectory(peers=entries):
                return "directory_too_large" if len(entries) > MAX_DIRECTORY else None
            case BarrierArrive(member=member):
                return None if member == sender else "barrier_for_another_node"
            case TokenChunk(plan_epoch=epoch):
                return token_refusal(sender, self._plan_stages(epoch))
            case StageFailure(node_id=node, plan_epoch=epoch):
                history = self.coordinator.history.plans
                plans = [history.get(epoch)] if epoch != -1 else history.values()
                if node != sender or not any(p is not None and sender in {s.node_id for s in p.stages} for p in plans):
                    return "failure_not_from_stage"
                return None
            case RequestOpen():
                stages = host.stages_of(message.plan_epoch)
                if stages is None or all(s.node_id != self.node_id for s in stages):
                    return OPEN_WITHOUT_STAGE
                refusal = request_open_refusal(message, sender, self.bounds)
                full = host.owner_of(message.request_id) != sender and host.requests_of(sender) >= self.slots_per_owner
                return "request_slots_per_owner_full" if refusal is None and full else refusal
            case StepInput():
                return step_refusal(
                    message,
                    sender,
                    node_id=self.node_id,
                    stages=host.stages_of(message.plan_epoch),
                    owner=host.owner_of(message.request_id),
                    bounds=self.bounds,
                )
            case ActivationChunk():
                return activation_refusal(
                    message, sender, node_id=self.node_id, stages=host.stages_of(message.plan_epoch)
                )
            case RequestClose(request_id=rid) | ResendTokens(request_id=rid):
                owner = host.owner_of(rid)
                return None if owner is None or owner == sender else "request_not_owned_by_sender"
        return None
