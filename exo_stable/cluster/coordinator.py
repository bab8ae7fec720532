"""Membership, placement and plan commitment for one node.

Members are this node and the peers whose handshake matched our model fingerprint and protocol. The
member with the smallest node id leads: whenever membership settles after a change, it computes a plan
(pure placement, deterministic for the membership), proposes it to every member, waits at the plan's
barrier until every stage reports its layers loaded (deadline and bounded retries; a timeout names the
missing stages), then commits it. Every node serves requests on the last committed plan; a request keeps
the plan it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from actors import ChildSpec, Restart, Supervisor
from exo_stable.loader import ModelSource
from exo_stable.modelspec import Dtype
from exo_stable.pipeline.barrier import BarrierError, Barriers
from exo_stable.pipeline.placement import (
    NodeResources,
    PlacementError,
    footprint_from_spec,
    plan_placement,
)
from exo_stable.pipeline.stage import Send, StageActor, StageConfig
from exo_stable.wire.handshake import PeerInfo
from exo_stable.wire.messages import (
    PROTOCOL_VERSION,
    BarrierArrive,
    Message,
    PlanCommit,
    PlanProposal,
    StageRange,
    StageStatus,
)

log = logging.getLogger(__name__)

_POLL_S = 5.0


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    split: tuple[int, ...] | None = None
    max_stages: int | None = None
    settle_s: float = 0.3
    load_timeout_s: float = 600.0
    plan_retries: int = 1
    max_requests: int = 16
    bytes_per_param: float = 4.0


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    memory_bytes: int
    model_fingerprint: str


@dataclass
class PlanHistory:
    """Committed plans by epoch (bounded): a running request keeps the plan it started with."""

    keep: int = 8
    plans: dict[int, PlanCommit] = field(default_factory=dict)

    def add(self, plan: PlanCommit) -> None:
        self.plans[plan.epoch] = plan
        for epoch in sorted(self.plans)[: -self.keep]:
            del self.plans[epoch]


class StageHost:
    """Keeps this node's StageActor (under a supervisor) in line with the plans it is asked to load."""

    def __init__(
        self,
        source: ModelSource,
        *,
        dtype: Dtype,
        node_id: str,
        send: Send,
        supervisor: Supervisor,
        options: ClusterOptions,
    ) -> None:
        self.source = source
        self.dtype = dtype
        self.node_id = node_id
        self.send = send
        self.supervisor = supervisor
        self.options = options
        self.current: tuple[int, tuple[StageRange, ...]] | None = None
        self.actor: StageActor | None = None
        self._lock = asyncio.Lock()

    @property
    def child_name(self) -> str:
        return "stage"

    async def apply(self, epoch: int, stages: tuple[StageRange, ...]) -> float:
        """Hold this node's stage of ``stages`` (or none); returns the seconds loading took.

        Proposals and commits may overlap (two nodes proposing at once while membership forms): one at a
        time, so that the stage child is never started twice.
        """
        async with self._lock:
            return await self._apply(epoch, stages)

    async def _apply(self, epoch: int, stages: tuple[StageRange, ...]) -> float:
        index = next((i for i, s in enumerate(stages) if s.node_id == self.node_id), None)
        if self.current is not None and self.current[1] == stages and index is not None:
            self.current = (epoch, stages)
            return 0.0
        if self.supervisor.child_ref(self.child_name) is not None:
            await self.supervisor.terminate_child(self.child_name, timeout=30.0)
        self.actor, self.current = None, None
        if index is None:
            return 0.0
        config = StageConfig(
            node_id=self.node_id,
            plan_epoch=epoch,
            stages=stages,
            index=index,
            dtype=self.dtype,
            max_requests=self.options.max_requests,
            load_timeout_s=self.options.load_timeout_s,
        )
        started = time.perf_counter()

        def factory() -> StageActor:
            self.actor = StageActor(self.source, config, self.send)
            return self.actor

        await self.supervisor.start_child(
            ChildSpec(self.child_name, factory, restart=Restart.PERMANENT, shutdown_timeout=30.0),
            timeout=self.options.load_timeout_s,
        )
        self.current = (epoch, stages)
        return time.perf_counter() - started

    async def deliver(self, message: Any) -> bool:
        ref = self.supervisor.child_ref(self.child_name)
        if ref is None:
            return False
        await ref.tell(message, timeout=30.0)
        return True

    def snapshot(self) -> dict[str, Any] | None:
        return None if self.actor is None else self.actor.snapshot()


class Coordinator:
    """Membership → placement → proposal → barrier → commit, for the node it runs on."""

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
        wait_links: Callable[[set[str], float], Awaitable[None]] | None = None,
    ) -> None:
        self.node_id = node_id
        self.wait_links = wait_links
        self.on_commit: Callable[[PlanCommit], None] | None = None
        self.barriers = barriers
        self.source = source
        self.fingerprint = source.fingerprint
        self.send = send
        self.stage_host = stage_host
        self.options = options
        self.members: dict[str, Member] = {node_id: Member(node_id, memory_bytes, source.fingerprint)}
        self.refused: dict[str, str] = {}
        self.membership_epoch = 0
        self.highest_epoch = 0
        self.active: PlanCommit | None = None
        self.history = PlanHistory()
        self.last_error = ""
        self._changed = asyncio.Event()
        self._changed.set()  # plan once at start (a single node plans for itself)
        self._committed = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._committed_to: set[str] = set()
        self._failed_rounds = 0
        self._proposer: dict[int, str] = {}

    # -- membership ------------------------------------------------------------------------------------

    @property
    def leader(self) -> str:
        return min(self.members)

    def on_membership(self, peer: PeerInfo | str, up: bool) -> None:
        if isinstance(peer, PeerInfo):
            if peer.model_fingerprint != self.fingerprint or peer.protocol_version != PROTOCOL_VERSION:
                reason = f"model {peer.model_fingerprint or '?'} / protocol {peer.protocol_version}"
                self.refused[peer.node_id] = reason
                log.warning(
                    "%s: %s holds a different model or protocol (%s); not a member", self.node_id, peer.node_id, reason
                )
                return
            self.members[peer.node_id] = Member(peer.node_id, peer.memory_bytes, peer.model_fingerprint)
        elif peer in self.members and peer != self.node_id:
            del self.members[peer]
        else:
            return
        self.membership_epoch += 1
        self._changed.set()

    # -- the leader's planning loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            while not stop.is_set():
                try:
                    async with asyncio.timeout(_POLL_S):
                        await self._changed.wait()
                except TimeoutError:
                    continue
                if stop.is_set():
                    break
                await self._settle()
                self._changed.clear()
                if self.leader == self.node_id:
                    try:
                        await self._plan_round()
                        self._failed_rounds = 0
                    except (PlacementError, ValueError, BarrierError, ConnectionError, TimeoutError) as exc:
                        self.last_error = str(exc)
                        self._failed_rounds += 1
                        delay = min(10.0, self.options.settle_s * 2**self._failed_rounds)
                        log.error("%s: planning failed (%s); trying again in %.1fs", self.node_id, exc, delay)
                        # Nothing else would wake this loop while membership stays the same: back off (or stop).
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                await stop.wait()
                        self._changed.set()
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

    def healthy(self, plan: PlanCommit) -> bool:
        """Every stage of ``plan`` is a live member."""
        return all(s.node_id in self.members for s in plan.stages)

    def wake(self) -> None:
        """Wake the planning loop (at shutdown, so that it notices the stop at once)."""
        self._changed.set()

    def force_split(self, split: tuple[int, ...] | None) -> None:
        """Re-plan with these layer counts per stage (None: back to placement by memory). Leader only."""
        self.options = replace(self.options, split=split)
        self._changed.set()

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
        if split is not None and len(self.members) < len(split):
            log.info("%s: split %s waits for %d nodes (%d so far)", self.node_id, split, len(split), len(self.members))
            return None
        footprint = footprint_from_spec(self.source.spec, self.options.bytes_per_param)
        nodes = [NodeResources(m.node_id, m.memory_bytes) for m in self.members.values()]
        plan = plan_placement(
            nodes,
            footprint,
            epoch=epoch,
            model_fingerprint=self.fingerprint,
            max_stages=len(split) if split is not None else self.options.max_stages,
            split=split,
        )
        return tuple(StageRange(s.node_id, s.start, s.end) for s in plan.stages)

    async def _plan_round(self) -> None:
        epoch = self.highest_epoch + 1
        stages = self.compute_plan(epoch)
        if stages is None:
            return
        if self.active is not None and self.active.stages == stages and set(self.members) == set(self._committed_to):
            return
        members = set(self.members)
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
            for node in sorted(members):
                await self.send(node, proposal)
            result = await barrier.sync_with_timeout(self.options.load_timeout_s, self.options.plan_retries)
        commit = PlanCommit(
            epoch=epoch,
            leader=self.node_id,
            model_fingerprint=self.fingerprint,
            n_layers=proposal.n_layers,
            stages=stages,
        )
        for node in sorted(members):
            await self.send(node, commit)
        self._committed_to = members
        log.info("%s: plan %d committed after %.2fs", self.node_id, epoch, result.elapsed_s)

    # -- messages from peers ---------------------------------------------------------------------------

    async def handle(self, sender: str, message: PlanProposal | StageStatus | PlanCommit) -> None:
        match message:
            case PlanProposal():
                if message.model_fingerprint != self.fingerprint:
                    detail = (
                        f"{self.node_id} holds model {self.fingerprint}, the plan is for {message.model_fingerprint}"
                    )
                    await self.send(
                        sender, StageStatus(epoch=message.epoch, node_id=self.node_id, ready=False, detail=detail)
                    )
                    return
                # Two nodes may propose the same epoch while membership forms: the smaller id wins.
                earlier = self._proposer.get(message.epoch)
                if message.epoch < self.highest_epoch or (earlier is not None and earlier <= sender):
                    return
                self._proposer[message.epoch] = sender
                for old_epoch in [e for e in self._proposer if e < message.epoch - 8]:
                    del self._proposer[old_epoch]
                self.highest_epoch = message.epoch
                assert self._tg is not None
                self._tg.create_task(self._load(sender, message), name=f"load plan {message.epoch}")
            case StageStatus():
                arrival = BarrierArrive(
                    name=plan_barrier(message.epoch), member=message.node_id, ok=message.ready, detail=message.detail
                )
                await self.barriers.arrive(arrival)
            case PlanCommit():
                active = self.active
                if active is not None and (message.epoch, active.leader) <= (active.epoch, message.leader):
                    return  # older, or the same epoch from a leader with a larger id
                self.highest_epoch = max(self.highest_epoch, message.epoch)
                if self.stage_host.current is None or self.stage_host.current[1] != message.stages:
                    await self.stage_host.apply(message.epoch, message.stages)
                self.active = message
                self.history.add(message)
                self._committed.set()
                if self.on_commit is not None:
                    self.on_commit(message)

    async def _load(self, leader: str, proposal: PlanProposal) -> None:
        try:
            seconds = await self.stage_host.apply(proposal.epoch, proposal.stages)
            if self.wait_links is not None:
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
