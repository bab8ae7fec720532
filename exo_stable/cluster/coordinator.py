"""Membership, placement and plan commitment for one node.

Members are this node and the peers whose handshake matched our model fingerprint and protocol. The
member with the smallest node id leads: whenever membership settles after a change, it computes a plan
(pure placement, deterministic for the membership), proposes it to every member, waits at the plan's
barrier until every stage reports its layers loaded (deadline and bounded retries; a timeout names the
missing stages), then commits it. Every node serves requests on the last committed plan; a request keeps
the plan it started with.

A node takes a proposal only from the leader of its own membership, naming only members, with an epoch that
follows the ones it agreed to (``roles.py``), and it takes a commit only for a proposal it acknowledged:
a member that refused a proposal is proposed to again in the next round. A committed plan one of whose
stages left is replaced by the next commit whatever its epoch, and the leader re-plans as soon as it sees
one, so no node waits on a plan that no live member can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from exo_stable.cluster.planstate import Member, PlanState, Verdict
from exo_stable.cluster.roles import Refusals
from exo_stable.cluster.stagehost import ClusterOptions, StageHost
from exo_stable.engine.loader import ModelSource
from exo_stable.logs import safe
from exo_stable.pipeline.barrier import BarrierError, Barriers, DistributedBarrier
from exo_stable.pipeline.placement import (
    NodeResources,
    PlacementError,
    StageAssignment,
    footprint_from_spec,
    plan_placement,
)
from exo_stable.pipeline.statistics import ClusterStatistics
from exo_stable.wire.handshake import PeerInfo
from exo_stable.wire.messages import (
    PROTOCOL_VERSION,
    BarrierArrive,
    Message,
    PlanCommit,
    PlanProposal,
    StageRange,
    StageStatus,
    SuspectNode,
)

log = logging.getLogger(__name__)

_POLL_S = 5.0
_KEEP_REFUSED = 64  # peers remembered as refused (for /health); older ones are forgotten


@dataclass
class PlanHistory:
    """Committed plans by epoch (bounded): a running request keeps the plan it started with."""

    keep: int = 8
    plans: dict[int, PlanCommit] = field(default_factory=dict)

    def add(self, plan: PlanCommit) -> None:
        self.plans[plan.epoch] = plan
        for epoch in sorted(self.plans)[: -self.keep]:
            del self.plans[epoch]


class Coordinator(PlanState):
    """Membership → placement → proposal → barrier → commit, for the node it runs on (the state and the
    rules of what it takes are :class:`PlanState`'s; this class adds the IO)."""

    def __init__(
        self,
        node_id: str,
        *,
        source: ModelSource,
        memory_bytes: int,
        send: Callable[[str, Message], Awaitable[None]],
        stage_host: StageHost,
        barriers: Barriers,
        options: ClusterOptions,
        wait_links: Callable[[set[str], float], Awaitable[None]],
        refusals: Refusals | None = None,
    ) -> None:
        """``wait_links(nodes, timeout)``: until this node has a link to each of ``nodes`` (a plan's stages)."""
        super().__init__(
            node_id, memory_bytes=memory_bytes, fingerprint=source.fingerprint, n_layers=source.spec.num_hidden_layers
        )
        self.refusals = refusals or Refusals(node_id)
        self.wait_links = wait_links
        self._commit_listeners: list[Callable[[PlanCommit], None]] = []
        self.barriers = barriers
        self.source = source
        self.send = send
        self.stage_host = stage_host
        self.options = options
        self.refused: OrderedDict[str, str] = OrderedDict()  # recent non-members and why (bounded)
        self.membership_epoch = 0
        self.history = PlanHistory()
        self.last_error = ""
        self.refusal: str | None = None
        """Why the last planning round found no plan for these members (None once one fits)."""
        self._changed = asyncio.Event()
        self._changed.set()  # plan once at start (a single node plans for itself)
        self._committed = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._committed_to: set[str] = set()
        self._refusers: set[str] = set()  # members that refused the current round's proposal
        self._failed_rounds = 0
        self.suspects: dict[str, tuple[float, str]] = {}  # node id: (until, on monotonic time; why)
        self._round_barrier: DistributedBarrier | None = None
        self._loads: set[asyncio.Task[None]] = set()  # plan loads in progress (owned by run's TaskGroup)
        self._pulse = asyncio.Event()  # set (and replaced) on every commit, membership change and suspect change
        self._lost_member = False  # a member left since the planning loop last woke: re-plan without settling

    # -- membership ------------------------------------------------------------------------------------

    def on_membership(self, peer: PeerInfo | str, up: bool) -> None:
        if isinstance(peer, PeerInfo):
            if peer.model_fingerprint != self.fingerprint or peer.protocol_version != PROTOCOL_VERSION:
                reason = f"model {safe(peer.model_fingerprint or '?', 80)} / protocol {peer.protocol_version}"
                self.refused[peer.node_id] = reason
                self.refused.move_to_end(peer.node_id)
                while len(self.refused) > _KEEP_REFUSED:
                    self.refused.popitem(last=False)
                log.warning(
                    "%s: %s holds a different model or protocol (%s); not a member",
                    self.node_id,
                    safe(peer.node_id),
                    reason,
                )
                return
            self.member_up(peer.node_id, peer.memory_bytes)
        elif self.member_down(peer):
            self._lost_member = True
        else:
            self.refused.pop(peer, None)  # a non-member left: nothing of it stays
            return
        self.membership_epoch += 1
        self._changed.set()
        if not up:
            node = peer if isinstance(peer, str) else peer.node_id
            barrier = self._round_barrier
            if barrier is not None and node in barrier.members:
                # A stage of the plan being loaded is gone: fail the round now, not at the load deadline.
                barrier.arrive(node, ok=False, detail=f"node {node} went down")
        self._notify()

    def subscribe(self, on_commit: Callable[[PlanCommit], None]) -> None:
        """Call ``on_commit`` with every plan this node commits from now on (the request owner's)."""
        self._commit_listeners.append(on_commit)

    def _notify(self) -> None:
        """Wake every waiter of :meth:`wait_recoverable` (each re-checks its condition)."""
        pulse, self._pulse = self._pulse, asyncio.Event()
        pulse.set()

    # -- suspects --------------------------------------------------------------------------------------

    def active_suspects(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(node for node, (until, _) in self.suspects.items() if until > now)

    def _expire_suspects(self) -> bool:
        """Forget suspects whose time is up; whether any was forgotten (they may join plans again)."""
        now = time.monotonic()
        expired = [node for node, (until, _) in self.suspects.items() if until <= now]
        for node in expired:
            del self.suspects[node]
            log.info("%s: %s is no longer suspect", self.node_id, node)
        return bool(expired)

    def record_suspect(self, node_id: str, reason: str, ttl_s: float) -> bool:
        """Leave ``node_id`` out of plans for ``ttl_s`` seconds; whether it was news (not suspect yet)."""
        news = node_id not in self.active_suspects()
        self.suspects[node_id] = (time.monotonic() + ttl_s, reason)
        if news:
            log.warning("%s: %s is suspect for %.0fs: %s", self.node_id, node_id, ttl_s, reason)
            self._changed.set()  # the leader re-plans without it
            self._notify()
        return news

    async def mark_suspect(self, node_id: str, reason: str) -> None:
        """Record ``node_id`` as suspect here and tell every member, so that whoever leads plans without it."""
        ttl = self.options.suspect_ttl_s
        if not self.record_suspect(node_id, reason, ttl):
            return
        note = SuspectNode(node_id=node_id, reporter=self.node_id, reason=reason, ttl_s=ttl)
        for member in sorted(self.members):
            if member == self.node_id:
                continue
            try:
                await self.send(member, note)
            except (ConnectionError, TimeoutError) as exc:
                log.warning("%s: could not tell %s that %s is suspect: %r", self.node_id, member, node_id, exc)

    def infeasible(self) -> str | None:
        """Why no plan fits the current members (minus suspects), or None when one does."""
        try:
            stages = self.compute_plan(self.highest_epoch + 1)
        except (PlacementError, ValueError) as exc:
            return str(exc)
        if stages is None:
            split = self.options.split
            return f"the forced split {split} needs {len(split or ())} nodes; {len(self._plannable())} are usable"
        return None

    async def wait_recoverable(
        self,
        predicate: Callable[[PlanCommit], bool],
        timeout: float,  # noqa: ASYNC109
    ) -> PlanCommit | str:
        """Wait for a committed plan satisfying ``predicate``; or, as soon as no plan fits the surviving
        nodes, return why (the caller falls back or fails). Raises ``TimeoutError`` past ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                pulse = self._pulse
                if self.active is not None and predicate(self.active):
                    return self.active
                reason = self.infeasible()
                if reason is not None:
                    return reason
                await pulse.wait()

    def statistics(self) -> ClusterStatistics:
        return ClusterStatistics(
            plan=self.active,
            membership_epoch=self.membership_epoch,
            members=frozenset(self.members),
            suspects=self.active_suspects(),
            refused=dict(self.refused),
            barrier=None if self._round_barrier is None else self._round_barrier.state(),
        )

    # -- the leader's planning loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            while not stop.is_set():
                try:
                    async with asyncio.timeout(_POLL_S):
                        await self._changed.wait()
                except TimeoutError:
                    expired = self._expire_suspects()
                    if expired:
                        self._notify()
                    elif self.active is None or self.healthy(self.active) or self.leader != self.node_id:
                        continue
                if stop.is_set():
                    break
                if self._lost_member:
                    # A stage that left stalls every request on its plan: plan now. Joins settle (they burst).
                    self._lost_member = False
                else:
                    await self._settle()
                self._changed.clear()
                if self.leader == self.node_id:
                    try:
                        await self._plan_round()
                        self._failed_rounds = 0
                        self.refusal = None
                    except PlacementError as exc:
                        # No plan fits these members: only a change of membership or suspects can change that,
                        # and either wakes this loop. Said once per new reason, not once per wake.
                        self.last_error = str(exc)
                        if self.refusal != str(exc):
                            self.refusal = str(exc)
                            log.warning("%s: no plan fits; waiting for more nodes: %s", self.node_id, exc)
                    except (ValueError, BarrierError, ConnectionError, TimeoutError) as exc:
                        self.last_error = str(exc)
                        # Members may run another plan now (one that refused this round had agreed to a later
                        # epoch, from a leader of a partition): the next round proposes even if the active plan
                        # looks whole from here.
                        self._committed_to = set()
                        self._failed_rounds += 1
                        delay = min(10.0, self.options.settle_s * 2**self._failed_rounds)
                        log.error("%s: planning failed (%s); trying again in %.1fs", self.node_id, exc, delay)
                        # Nothing else would wake this loop while membership stays the same: back off (or stop).
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                await stop.wait()
                        self._changed.set()
            # Stopping: a load may still wait (up to its deadline) for links to a node that is gone.
            for load in list(self._loads):
                load.cancel()
            self._tg = None

    async def _settle(self) -> None:
        """Wait until membership has not changed for ``settle_s`` (joins often come in bursts)."""
        while True:
            seen = self.membership_epoch
            self._changed.clear()
            try:
                async with asyncio.timeout(self.options.settle_s):
                    await self._changed.wait()
            except TimeoutError:
                if seen == self.membership_epoch:
                    return

    def healthy(self, plan: PlanCommit, suspects: frozenset[str] | None = None) -> bool:
        """Every stage of ``plan`` is a live member, and none is suspect."""
        return super().healthy(plan, self.active_suspects() if suspects is None else suspects)

    def _plannable(self) -> list[Member]:
        """Members a plan may use: all but the suspects."""
        suspects = self.active_suspects()
        return [m for m in self.members.values() if m.node_id not in suspects]

    def wake(self) -> None:
        """Wake the planning loop (at shutdown, so that it notices the stop at once)."""
        self._changed.set()

    def force_split(self, split: tuple[int, ...] | None) -> None:
        """Re-plan with these layer counts per stage (None: back to placement by memory). Leader only."""
        self.options = replace(self.options, split=split)
        self._changed.set()

    async def wait_change(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout`` seconds) for the next commit, membership change or suspect change."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._pulse.wait()

    async def wait_plan_where(self, predicate: Callable[[PlanCommit], bool], timeout: float) -> PlanCommit:  # noqa: ASYNC109
        """Wait until the active plan satisfies ``predicate`` (e.g. it has three stages)."""
        async with asyncio.timeout(timeout):
            while self.active is None or not predicate(self.active):
                self._committed.clear()
                await self._committed.wait()
        return self.active

    def compute_plan(self, epoch: int) -> tuple[StageRange, ...] | None:
        """This membership's plan, or None while a forced split waits for enough members."""
        split = self.options.split
        usable = self._plannable()
        if not usable:
            raise PlacementError(f"every member is suspect: {sorted(self.active_suspects())}")
        if split is not None and len(usable) < len(split):
            return None
        footprint = self.options.footprint or footprint_from_spec(self.source.spec, self.options.bytes_per_param)
        if split is None:
            # A member that cannot hold one layer (or says so) serves no stage; it does not stop the others'.
            usable = [m for m in usable if m.memory_bytes >= footprint.per_layer or m.node_id == self.node_id]
        nodes = [NodeResources(m.node_id, m.memory_bytes) for m in usable]
        # Sticky: when stages left the plan in force, the survivors keep their layers and their neighbours
        # take over the departed ranges (each survivor builds only what it lacks).
        active = self.active
        previous = None if active is None else tuple(StageAssignment(s.node_id, s.start, s.end) for s in active.stages)
        plan = plan_placement(
            nodes,
            footprint,
            epoch=epoch,
            model_fingerprint=self.fingerprint,
            max_stages=len(split) if split is not None else self.options.max_stages,
            split=split,
            previous=previous,
        )
        return tuple(StageRange(s.node_id, s.start, s.end) for s in plan.stages)

    async def _plan_round(self) -> None:
        epoch = self.next_epoch()
        stages = self.compute_plan(epoch)
        if stages is None:
            split = self.options.split
            log.info(
                "%s: split %s waits for %d nodes (%d so far)",
                self.node_id,
                split,
                len(split or ()),
                len(self._plannable()),
            )
            return
        active = self.active
        if (
            active is not None
            and active.stages == stages
            and set(self.members) == set(self._committed_to)
            and self.healthy(active)
        ):
            return
        members = set(self.members)
        # The round waits for the stages. Every member gets the proposal before the commit (links keep order),
        # so an honest one acknowledged it; one that refused it says so and the next round includes it again.
        self._refusers = set()
        stage_nodes = frozenset(s.node_id for s in stages)
        proposal = PlanProposal(
            epoch=epoch,
            leader=self.node_id,
            model_fingerprint=self.fingerprint,
            n_layers=self.source.spec.num_hidden_layers,
            stages=stages,
        )

        async def resend(missing: frozenset[str], attempt: int) -> None:
            log.warning("%s: plan %d attempt %d, still loading: %s", self.node_id, epoch, attempt, sorted(missing))
            for node in missing:
                await self.send(node, proposal)

        async with self.barriers.opened(plan_barrier(epoch), stage_nodes, resend) as barrier:
            log.info("%s: proposing plan %d: %s", self.node_id, epoch, _describe(stages))
            self._round_barrier = barrier
            try:
                for node in sorted(members):
                    await self.send(node, proposal)
                result = await barrier.sync_with_timeout(self.options.load_timeout_s, self.options.plan_retries)
            finally:
                self._round_barrier = None
        if self.leader != self.node_id:
            # Members came back during the round and another node leads now: its commit would be refused by
            # every member (this node's own router included); the leader plans from here.
            log.info("%s: plan %d abandoned: %s leads now", self.node_id, epoch, self.leader)
            return
        commit = PlanCommit(
            epoch=epoch,
            leader=self.node_id,
            model_fingerprint=self.fingerprint,
            n_layers=proposal.n_layers,
            stages=stages,
        )
        for node in sorted(members):
            await self.send(node, commit)
        self._committed_to = members - self._refusers
        if self._refusers:
            self._changed.set()  # propose again (past the epochs they agreed to) once this round is done
        log.info("%s: plan %d committed after %.2fs", self.node_id, epoch, result.elapsed_s)

    # -- messages from peers ---------------------------------------------------------------------------

    async def handle(self, sender: str, message: PlanProposal | StageStatus | PlanCommit | SuspectNode) -> None:
        """Act on a member's message about membership or plans, if the sender holds the role it needs."""
        match message:
            case SuspectNode():
                if message.reporter != sender:
                    self.refusals.refuse(sender, "suspect_reporter_mismatch", message)
                    return
                if not math.isfinite(message.ttl_s) or message.node_id not in self.members:
                    self.refusals.refuse(sender, "suspect_invalid", message)
                    return
                active = self.active
                stages = set() if active is None else {s.node_id for s in active.stages}
                if sender != message.node_id and sender not in stages:
                    # Only a node itself, or a stage of the plan it serves in, may have it left out of plans.
                    self.refusals.refuse(sender, "suspect_not_from_stage", message)
                    return
                ttl = min(max(message.ttl_s, 0.0), self.options.suspect_ttl_s)
                self.record_suspect(message.node_id, f"{safe(message.reason)} (from {sender})", ttl)
            case PlanProposal():
                await self._on_proposal(sender, message)
            case StageStatus():
                if message.node_id != sender:
                    self.refusals.refuse(sender, "status_for_another_node", message)
                    return
                if not message.ready:
                    self.learn_agreed(message.agreed_epoch)  # a member agreed to later plans: propose past them
                    self._refusers.add(message.node_id)  # it will not take this round's commit
                arrival = BarrierArrive(
                    name=plan_barrier(message.epoch), member=message.node_id, ok=message.ready, detail=message.detail
                )
                await self.barriers.arrive(arrival)
            case PlanCommit():
                await self._on_commit(sender, message)

    async def _on_proposal(self, sender: str, message: PlanProposal) -> None:
        refusal = self.take_proposal(sender, message)
        if refusal is not None:
            self.refusals.refuse(sender, refusal, message)
            if sender in self.members and sender != self.node_id:
                # The would-be leader's round fails now (and it re-plans), not at its load deadline.
                detail = f"{self.node_id} refused plan {message.epoch} ({refusal}); it sees {self.leader} leading"
                status = StageStatus(
                    epoch=message.epoch,
                    node_id=self.node_id,
                    ready=False,
                    detail=detail,
                    agreed_epoch=self.highest_epoch,
                )
                await self.send(sender, status)
            return
        assert self._tg is not None
        load = self._tg.create_task(self._load(sender, message), name=f"load plan {message.epoch}")
        self._loads.add(load)
        load.add_done_callback(self._loads.discard)

    async def _on_commit(self, sender: str, message: PlanCommit) -> None:
        verdict = self.judge_commit(sender, message, self.active_suspects())
        if isinstance(verdict, str):
            self.refusals.refuse(sender, verdict, message)
            return
        if verdict is Verdict.STALE:
            return
        if self.stage_host.current is None or self.stage_host.current[1] != message.stages:
            await self.stage_host.apply(message.epoch, message.stages)
        self.adopt(message)
        self.history.add(message)
        self._committed.set()
        self._notify()
        for listener in self._commit_listeners:
            listener(message)

    async def _load(self, leader: str, proposal: PlanProposal) -> None:
        try:
            seconds = await self.stage_host.apply(proposal.epoch, proposal.stages)
            # Ready means loaded *and* linked to every other stage of the plan (the ring needs them).
            await self.wait_links({s.node_id for s in proposal.stages}, self.options.load_timeout_s)
            status = StageStatus(epoch=proposal.epoch, node_id=self.node_id, ready=True, load_s=seconds)
        except Exception as exc:  # reported to the leader, whose barrier fails with this reason
            log.exception("%s: loading plan %d failed", self.node_id, proposal.epoch)
            status = StageStatus(epoch=proposal.epoch, node_id=self.node_id, ready=False, detail=str(exc))
        await self.send(leader, status)

    async def wait_plan(self, timeout: float) -> PlanCommit:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            await self._committed.wait()
        assert self.active is not None
        return self.active


def plan_barrier(epoch: int) -> str:
    return f"plan/{epoch}"


def _describe(stages: tuple[StageRange, ...]) -> str:
    return " ".join(f"{s.node_id}[{s.start},{s.end})" for s in stages)
