"""Which peer may send which message: the role checks of a node's dispatcher. Pure.

A link proves who is at the other end (and, with a cluster secret, that it may join); it does not make
every message from there legitimate. A message is acted on only when its sender holds the role it needs:

- anything at all: the sender is a member (a peer with this node's model and protocol);
- plan proposals and commits: from the leader of this node's membership, naming only members, with an
  epoch that follows what this node agreed to; a commit only for a proposal this node acknowledged;
- stage work (request opens, steps, activations, closes, resends): for a plan whose stage this node
  holds, from the request's owner, or from the stage before this one;
- tokens: from the last stage of the plan the request runs on; stage failures: from a stage of it;
- notes about other nodes (suspects, barrier arrivals, stage statuses): only about the sender itself.

Anything else is refused: :class:`Refusals` counts it by kind and logs it once per sender and kind.
Message fields a peer controls are bounded like a client's (token budgets, positions, token ids).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Final

from exo_stable.logs import safe
from exo_stable.wire.messages import (
    ActivationChunk,
    PlanCommit,
    PlanProposal,
    RequestOpen,
    StageRange,
    StepInput,
)

log = logging.getLogger(__name__)

MAX_EPOCH: Final = 1 << 53
"""No plan epoch beyond this is taken from a peer (its successor must still encode as an int64)."""
MAX_EPOCH_STEP: Final = 1 << 16
"""Once this node has agreed to a plan, a proposal may jump at most this far past that epoch."""
MAX_DIRECTORY: Final = 256
"""Entries of one peer directory that are dialed (a larger one is refused)."""


def epoch_follows(epoch: int, agreed: int, *, has_plan: bool) -> bool:
    """Whether a proposed ``epoch`` may follow the highest epoch this node ``agreed`` to."""
    if not agreed <= epoch <= MAX_EPOCH:
        return False
    return not has_plan or epoch - agreed <= MAX_EPOCH_STEP


def plan_shape_error(stages: tuple[StageRange, ...], n_layers: int, expected_layers: int) -> str | None:
    """Why ``stages`` is not a plan of this model (contiguous ranges covering every layer once, one per node)."""
    if n_layers != expected_layers:
        return f"plan for {n_layers} layers, the model has {expected_layers}"
    if not stages:
        return "plan without stages"
    if len({s.node_id for s in stages}) != len(stages):
        return "plan names a node twice"
    at = 0
    for s in stages:
        if s.start != at or s.end <= s.start:
            return f"stage {s.node_id} [{s.start},{s.end}) does not follow layer {at}"
        at = s.end
    if at != expected_layers:
        return f"plan covers {at} of {expected_layers} layers"
    return None


def proposal_refusal(
    message: PlanProposal | PlanCommit,
    sender: str,
    *,
    leader: str,
    members: frozenset[str],
    expected_layers: int,
) -> str | None:
    """The refusal kind of a proposal or commit whose sender is not this membership's leader, or None."""
    what = "proposal" if isinstance(message, PlanProposal) else "commit"
    if sender != message.leader:
        return f"{what}_leader_mismatch"
    if sender != leader:
        return f"{what}_not_from_leader"
    if any(s.node_id not in members for s in message.stages):
        return f"{what}_names_non_member"
    if plan_shape_error(message.stages, message.n_layers, expected_layers) is not None:
        return f"{what}_malformed"
    return None


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a peer's request may ask for: what the model can hold, as for a client of this node's API."""

    context_length: int
    vocab_size: int


def request_open_refusal(message: RequestOpen, sender: str, bounds: Bounds) -> str | None:
    if sender != message.owner:
        return "request_open_not_owner"
    ctx = bounds.context_length
    if not 0 < message.max_tokens <= ctx or not 0 <= message.prompt_tokens <= ctx:
        return "request_open_out_of_bounds"
    if message.prompt_tokens + message.max_tokens > ctx:
        return "request_open_out_of_bounds"
    if len(message.history) > ctx or not 0 <= message.first_position <= ctx:
        return "request_open_out_of_bounds"
    if any(not 0 <= t < bounds.vocab_size for t in message.history):
        return "request_open_out_of_bounds"
    f = message.spot_check_fraction
    if not (math.isfinite(f) and 0.0 <= f <= 1.0):
        return "request_open_out_of_bounds"
    s = message.sampling
    if not (math.isfinite(s.temperature) and s.temperature >= 0 and math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        return "request_open_out_of_bounds"
    if s.top_k < 0 or not 0 <= s.seed < 1 << 64:
        return "request_open_out_of_bounds"
    return None


def step_refusal(
    message: StepInput,
    sender: str,
    *,
    node_id: str,
    stages: tuple[StageRange, ...] | None,
    owner: str | None,
    bounds: Bounds,
) -> str | None:
    """A step (token ids into stage 0): from the request's owner or the plan's last stage (the next token)."""
    if stages is None or stages[0].node_id != node_id:
        return "step_without_stage"
    if sender != stages[-1].node_id and (owner is None or sender != owner):
        return "step_not_from_owner"
    if not 0 <= message.position < bounds.context_length or len(message.tokens) > bounds.context_length:
        return "step_out_of_bounds"
    if any(not 0 <= t < bounds.vocab_size for t in message.tokens):
        return "step_out_of_bounds"
    return None


def activation_refusal(
    message: ActivationChunk, sender: str, *, node_id: str, stages: tuple[StageRange, ...] | None
) -> str | None:
    """Activations come from the stage right before this node's in the plan they name."""
    if stages is None:
        return "activation_without_stage"
    index = next((i for i, s in enumerate(stages) if s.node_id == node_id), None)
    if index is None or index == 0 or stages[index - 1].node_id != sender:
        return "activation_not_from_previous_stage"
    return None


def token_refusal(sender: str, stages: tuple[StageRange, ...] | None) -> str | None:
    """Tokens come from the last stage of the plan the request runs on."""
    if stages is None:
        return "token_unknown_plan"
    if stages[-1].node_id != sender:
        return "token_not_from_last_stage"
    return None


class Refusals:
    """Refused peer messages: counted by kind; each (sender, kind) logged once (the memory of that is bounded)."""

    def __init__(self, node_id: str, *, remember: int = 1024) -> None:
        self.node_id = node_id
        self.by_kind: Counter[str] = Counter()
        self._logged: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def refuse(self, sender: str, kind: str, message: object) -> None:
        self.by_kind[kind] += 1
        key = (sender, kind)
        if key in self._logged:
            self._logged.move_to_end(key)
            return
        self._logged[key] = None
        if len(self._logged) > self._remember:
            self._logged.popitem(last=False)
        log.warning(
            "%s: refused %s from %s (%s); further ones from it are only counted",
            self.node_id,
            type(message).__name__,
            safe(sender),
            kind,
        )
