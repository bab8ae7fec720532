"""Model check of the membership / plan state machine (cluster/planstate.py) with hypothesis.

A simulated cluster of honest nodes, each a real :class:`PlanState`, runs the leader's protocol (propose to
every member, commit once every stage acknowledged, re-plan when membership changes, a round fails, or a
member refused the last proposal) over
links that deliver in any order. Hypothesis interleaves deliveries with crashes, membership news arriving
late, and a misbehaving peer (a non-member, a member that is not the leader, or one that leads for a while)
that sends forged proposals and commits, huge epochs, and replays of messages it saw. Invariants:

- at most one plan per epoch among commits of honest leaders;
- no honest node ever adopts a plan naming a node that was never a member of it;
- once faults stop and the misbehaving peer has left, every live node ends, within a bounded number of
  rounds (a waiting request's deadline), on the same committed plan, whose stages are all live members.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_stable.cluster.planstate import PlanState, Verdict
from exo_stable.cluster.roles import MAX_EPOCH
from exo_stable.wire.messages import Message, PlanCommit, PlanProposal, StageRange, StageStatus

LAYERS = 8
FP = "fp"
CONVERGE_ROUNDS = 40


def placement(members: list[str]) -> tuple[StageRange, ...]:
    nodes = sorted(members)
    per, extra = divmod(LAYERS, len(nodes))
    stages, at = [], 0
    for i, node in enumerate(nodes):
        n = per + (i < extra)
        stages.append(StageRange(node, at, at + n))
        at += n
    return tuple(stages)


@dataclass
class Round:
    epoch: int
    stages: tuple[StageRange, ...]
    members: frozenset[str]
    waiting: set[str]
    refusers: set[str] = field(default_factory=set)


@dataclass
class Sim:
    honest: list[str]
    bad: str | None
    bad_member: bool
    rng: random.Random
    states: dict[str, PlanState] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)
    queue: list[tuple[str, str, Message | str]] = field(default_factory=list)  # (src, dst, message | "down")
    rounds: dict[str, Round | None] = field(default_factory=dict)
    committed_to: dict[str, frozenset[str]] = field(default_factory=dict)
    seen: list[Message] = field(default_factory=list)
    honest_plans: dict[int, tuple[StageRange, ...]] = field(default_factory=dict)
    ever_members: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for node in self.honest:
            s = PlanState(node, memory_bytes=1 << 30, fingerprint=FP, n_layers=LAYERS)
            for other in self.honest:
                if other != node:
                    s.member_up(other, 1 << 30)
            if self.bad is not None and self.bad_member:
                s.member_up(self.bad, 1 << 30)
            self.states[node] = s
            self.rounds[node] = None
        self.alive = set(self.honest)
        self.ever_members = set(self.honest) | ({self.bad} if self.bad and self.bad_member else set())

    # -- the network ---------------------------------------------------------------------------------------

    def send(self, src: str, dst: str, message: Message | str) -> None:
        if dst in self.alive:
            self.queue.append((src, dst, message))
            if isinstance(message, PlanProposal | PlanCommit):
                self.seen.append(message)

    def deliver(self, index: int) -> None:
        src, dst, message = self.queue.pop(index % len(self.queue))
        if dst not in self.alive:
            return
        state = self.states[dst]
        if message == "down":
            if state.member_down(src):
                r = self.rounds[dst]
                if r is not None and src in r.waiting:
                    self.rounds[dst] = None  # the round fails at once (the barrier's arrival on a node going down)
            return
        if src != dst and src not in state.members:
            return  # a non-member's message is never acted on (the node's dispatcher)
        match message:
            case PlanProposal():
                refusal = state.take_proposal(src, message)
                status = StageStatus(
                    epoch=message.epoch, node_id=dst, ready=refusal is None, agreed_epoch=state.highest_epoch
                )
                self.send(dst, src, status)
            case StageStatus():
                r = self.rounds[dst]
                if message.node_id != src:
                    return
                if not message.ready:
                    state.learn_agreed(message.agreed_epoch)
                if r is None or r.epoch != message.epoch:
                    return
                if not message.ready:
                    r.refusers.add(src)
                    if src in r.waiting:  # a stage refused: the round fails
                        self.rounds[dst] = None
                    return
                r.waiting.discard(src)
                if not r.waiting:
                    commit = PlanCommit(
                        epoch=r.epoch, leader=dst, model_fingerprint=FP, n_layers=LAYERS, stages=r.stages
                    )
                    known = self.honest_plans.setdefault(r.epoch, r.stages)
                    assert known == r.stages, f"two honest plans for epoch {r.epoch}: {known} and {r.stages}"
                    for member in sorted(r.members):
                        self.send(dst, member, commit)
                    self.committed_to[dst] = r.members - r.refusers
                    self.rounds[dst] = None
            case PlanCommit():
                verdict = state.judge_commit(src, message)
                if verdict is Verdict.ADOPT:
                    named = {s.node_id for s in message.stages}
                    assert named <= self.ever_members, f"{dst} adopted a plan naming non-members: {named}"
                    state.adopt(message)

    # -- the honest leader -----------------------------------------------------------------------------------

    def tick(self, node: str) -> None:
        """The leader's planning loop, once: propose when the plan does not match the membership."""
        state = self.states[node]
        if node not in self.alive or state.leader != node or self.rounds[node] is not None:
            return
        stages = placement(list(state.members))
        active = state.active
        if (
            active is not None
            and active.stages == stages
            and state.healthy(active)
            and self.committed_to.get(node) == frozenset(state.members)
        ):
            return
        epoch = state.next_epoch()
        proposal = PlanProposal(epoch=epoch, leader=node, model_fingerprint=FP, n_layers=LAYERS, stages=stages)
        members = frozenset(state.members)
        self.rounds[node] = Round(epoch, stages, members, {s.node_id for s in stages})
        for member in sorted(members):
            self.send(node, member, proposal)

    def crash(self, node: str) -> None:
        if node not in self.alive or len(self.alive) == 1:
            return
        self.alive.discard(node)
        self.queue = [q for q in self.queue if q[1] != node and q[0] != node]
        for other in sorted(self.alive):
            self.send(node, other, "down")

    # -- the misbehaving peer ----------------------------------------------------------------------------

    def misbehave(self, kind: int, target: str, epoch: int) -> None:
        bad = self.bad
        if bad is None or target not in self.alive:
            return
        pick = [*self.honest, bad]
        stages = placement(self.rng.sample(pick, self.rng.randint(1, len(pick))))
        leader = self.rng.choice(pick)
        fields = dict(epoch=epoch, leader=leader, model_fingerprint=FP, n_layers=LAYERS, stages=stages)
        if kind == 0:
            self.queue.append((bad, target, PlanProposal(**fields)))  # type: ignore[arg-type]
        elif kind == 1:
            self.queue.append((bad, target, PlanCommit(**fields)))  # type: ignore[arg-type]
        elif kind == 2 and self.seen:
            self.queue.append((bad, target, self.rng.choice(self.seen)))  # a replay, from the bad peer's link
        elif kind == 3:
            self.queue.append((bad, target, StageStatus(epoch=epoch, node_id=leader, ready=True)))

    def bad_leaves(self) -> None:
        if self.bad is not None and self.bad_member:
            for node in sorted(self.alive):
                self.queue.append((self.bad, node, "down"))
        self.bad = None

    # -- the end -------------------------------------------------------------------------------------------

    def converge(self) -> int:
        """Deliver everything and let leaders plan until quiet; returns the rounds it took."""
        for rounds in range(CONVERGE_ROUNDS):
            for node in sorted(self.alive):
                self.tick(node)
            if not self.queue and all(self.rounds[n] is None for n in self.alive) and self.settled():
                return rounds
            while self.queue:
                self.deliver(self.rng.randrange(len(self.queue)))
        raise AssertionError(f"no agreement after {CONVERGE_ROUNDS} rounds: {self.describe()}")

    def settled(self) -> bool:
        plans = {self.states[n].active for n in self.alive}
        if len(plans) != 1:
            return False
        plan = plans.pop()
        return plan is not None and {s.node_id for s in plan.stages} == self.alive

    def describe(self) -> str:
        return "; ".join(
            f"{n}: members {sorted(self.states[n].members)} plan "
            f"{None if (a := self.states[n].active) is None else (a.epoch, [s.node_id for s in a.stages])}"
            for n in sorted(self.alive)
        )


actions = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), st.integers(0, 1000)),
        st.tuples(st.just("tick"), st.integers(0, 3)),
        st.tuples(st.just("crash"), st.integers(0, 3)),
        st.tuples(
            st.just("bad"),
            st.integers(0, 3),
            st.integers(0, 3),
            st.one_of(st.integers(0, 12), st.just(MAX_EPOCH), st.just(1 << 62), st.integers(-5, -1)),
        ),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 4),
    bad=st.sampled_from([None, "a-bad", "zz-bad"]),
    bad_member=st.booleans(),
    steps=actions,
    seed=st.integers(0, 2**32 - 1),
)
def test_plans_agree_on_live_members_whatever_the_interleaving(
    n: int, bad: str | None, bad_member: bool, steps: list[tuple[object, ...]], seed: int
) -> None:
    sim = Sim([f"n{i}" for i in range(n)], bad, bad_member, random.Random(seed))
    for step in steps:
        match step:
            case ("deliver", int(i)) if sim.queue:
                sim.deliver(i)
            case ("tick", int(i)):
                sim.tick(sim.honest[i % n])
            case ("crash", int(i)):
                sim.crash(sim.honest[i % n])
            case ("bad", int(kind), int(i), int(epoch)):
                sim.misbehave(kind, sim.honest[i % n], epoch)
    sim.bad_leaves()
    rounds = sim.converge()
    assert rounds <= 2 * n + 4, f"agreement took {rounds} rounds: {sim.describe()}"
    plan = sim.states[min(sim.alive)].active
    assert plan is not None and plan.leader in sim.honest
    assert sim.honest_plans.get(plan.epoch) == plan.stages
