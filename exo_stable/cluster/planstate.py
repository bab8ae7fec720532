"""What one node agreed to about membership and plans, and which plan messages it takes. Pure (no IO).

The :class:`~exo_stable.cluster.coordinator.Coordinator` is this state plus the IO around it (links,
barriers, stage loads); ``tests/test_planstate_model.py`` model-checks it with random message sequences
from honest, crashed and misbehaving peers.

- Members are this node and the peers with its model and protocol; the smallest id leads.
- A proposal is taken only from that leader, naming only members, with an epoch that follows the ones
  this node agreed to (:func:`~exo_stable.cluster.roles.epoch_follows`); when two leaders propose the same
  epoch while membership forms, the smaller id wins.
- A commit is taken only from the leader, for a proposal this node acknowledged, and replaces the active
  plan when it is newer, or whatever its epoch when a stage of the active plan is no longer a member.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from exo_stable.cluster.roles import MAX_EPOCH, MAX_EPOCH_STEP, epoch_follows, proposal_refusal
from exo_stable.wire.messages import PlanCommit, PlanProposal

KEEP_PROPOSALS: Final = 8  # acknowledged proposals remembered (a commit must match one)


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    memory_bytes: int
    model_fingerprint: str


class Verdict(enum.Enum):
    ADOPT = "adopt"
    STALE = "stale"  # a legitimate commit older than the active plan: nothing to do
    REFUSED = "refused"


class PlanState:
    """Membership, the highest epoch agreed to, acknowledged proposals and the active plan of one node."""

    def __init__(self, node_id: str, *, memory_bytes: int, fingerprint: str, n_layers: int) -> None:
        self.node_id = node_id
        self.fingerprint = fingerprint
        self.n_layers = n_layers
        self.members: dict[str, Member] = {node_id: Member(node_id, memory_bytes, fingerprint)}
        self.highest_epoch = 0
        self.active: PlanCommit | None = None
        self.acknowledged: dict[int, PlanProposal] = {}  # epoch: the proposal this node took for it

    @property
    def leader(self) -> str:
        return min(self.members)

    def member_up(self, node_id: str, memory_bytes: int) -> None:
        # A negative claim would make every placement fail: it counts as no memory.
        self.members[node_id] = Member(node_id, max(0, memory_bytes), self.fingerprint)

    def member_down(self, node_id: str) -> bool:
        """Whether ``node_id`` was a member (this node never leaves its own membership)."""
        if node_id == self.node_id or node_id not in self.members:
            return False
        del self.members[node_id]
        return True

    def healthy(self, plan: PlanCommit, suspects: frozenset[str] = frozenset()) -> bool:
        """Every stage of ``plan`` is a live member, and none is suspect."""
        return all(s.node_id in self.members and s.node_id not in suspects for s in plan.stages)

    def _role(self, sender: str, message: PlanProposal | PlanCommit) -> str | None:
        if sender not in self.members:
            return "not_a_member"
        return proposal_refusal(
            message, sender, leader=self.leader, members=frozenset(self.members), expected_layers=self.n_layers
        )

    def take_proposal(self, sender: str, message: PlanProposal) -> str | None:
        """Acknowledge ``message`` (this node loads its stage of it), or return the refusal's kind."""
        refusal = self._role(sender, message)
        if refusal is None and not epoch_follows(message.epoch, self.highest_epoch, has_plan=self.active is not None):
            refusal = "proposal_epoch_out_of_order"
        earlier = self.acknowledged.get(message.epoch)
        if refusal is None and earlier is not None and message.epoch == self.highest_epoch:
            refusal = None if sender < earlier.leader else "proposal_epoch_taken"
        if refusal is not None:
            return refusal
        self.acknowledged[message.epoch] = message
        for old_epoch in sorted(self.acknowledged)[:-KEEP_PROPOSALS]:
            del self.acknowledged[old_epoch]
        self.highest_epoch = message.epoch
        return None

    def judge_commit(self, sender: str, message: PlanCommit, suspects: frozenset[str] = frozenset()) -> Verdict | str:
        """:attr:`Verdict.ADOPT` or :attr:`Verdict.STALE`, or the refusal's kind."""
        refusal = self._role(sender, message)
        proposal = self.acknowledged.get(message.epoch)
        if refusal is None and (proposal is None or proposal.leader != sender or proposal.stages != message.stages):
            refusal = "commit_not_acknowledged"
        if refusal is not None:
            return refusal
        active = self.active
        if (
            active is not None
            and self.healthy(active, suspects)
            and (message.epoch, active.leader) <= (active.epoch, message.leader)
        ):
            return Verdict.STALE  # older, or the same epoch from a leader with a larger id
        return Verdict.ADOPT

    def adopt(self, message: PlanCommit) -> None:
        self.highest_epoch = max(self.highest_epoch, message.epoch)
        self.active = message

    def learn_agreed(self, agreed_epoch: int) -> None:
        """A member refused a proposal because it agreed to ``agreed_epoch``: the next proposal goes past it."""
        if self.highest_epoch < agreed_epoch <= MAX_EPOCH - MAX_EPOCH_STEP:
            self.highest_epoch = agreed_epoch

    def next_epoch(self) -> int:
        return self.highest_epoch + 1
