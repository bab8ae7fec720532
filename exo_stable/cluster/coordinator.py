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

from actors import ActorDead, ChildSpec, MailboxFull, Restart, Supervisor
from exo_stable.loader import ModelSource
from exo_stable.modelspec import Dtype
from exo_stable.pipeline.barrier import BarrierError, Barriers, DistributedBarrier
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
    RequestClose,
    ResendTokens,
    StageFailure,
    StageRange,
    StageStatus,
    SuspectNode,
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
    suspect_ttl_s: float = 60.0
    decode_ahead: bool = True  # a stage holding the whole model queues greedy steps ahead (StageConfig)
    build_ahead: bool = True  # stages build each decode step's graph while the others compute (StageConfig)


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
        self.restarts_before = 0
        self._child: str | None = None  # the child holding this node's stage of the current plan
        self._actors: dict[str, StageActor] = {}  # child name: its current incarnation
        self._routes: dict[int, str] = {}  # plan epoch: the child that serves it
        self._draining: set[str] = set()  # children of replaced plans that still serve running requests
        self._lock = asyncio.Lock()

    @property
    def child_name(self) -> str | None:
        return self._child

    @property
    def draining(self) -> int:
        """Stages of replaced plans still serving the requests that started on them."""
        return len(self._draining)

    async def apply(self, epoch: int, stages: tuple[StageRange, ...]) -> float:
        """Hold this node's stage of ``stages`` (or none); returns the seconds loading took.

        Proposals and commits may overlap (two nodes proposing at once while membership forms): one at a
        time, so that the stage child is never started twice. The stage of the replaced plan is stopped at
        once when it holds no request; otherwise it drains: running requests keep their plan (their steps
        carry its epoch) until they close, while new requests use the new stage.
        """
        async with self._lock:
            return await self._apply(epoch, stages)

    async def _apply(self, epoch: int, stages: tuple[StageRange, ...]) -> float:
        index = next((i for i, s in enumerate(stages) if s.node_id == self.node_id), None)
        if self.current is not None and self.current[1] == stages and index is not None and self._child:
            self.current = (epoch, stages)
            self._routes[epoch] = self._child
            return 0.0
        old = self._child
        self.actor, self.current, self._child = None, None, None
        if old is not None:
            await self._retire(old, epoch)
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
            decode_ahead=self.options.decode_ahead,
            build_ahead=self.options.build_ahead,
        )
        started = time.perf_counter()
        name = f"stage-{epoch}"

        def factory() -> StageActor:
            actor = StageActor(self.source, config, self.send)
            self._actors[name] = actor
            if self._child == name:
                self.actor = actor
            return actor

        self._child = name
        try:
            await self.supervisor.start_child(
                ChildSpec(name, factory, restart=Restart.PERMANENT, shutdown_timeout=30.0),
                timeout=self.options.load_timeout_s,
            )
        except BaseException:
            self._child, self.actor = None, None
            self._actors.pop(name, None)
            raise
        self.current = (epoch, stages)
        self._routes[epoch] = name
        return time.perf_counter() - started

    async def _retire(self, name: str, epoch: int) -> None:
        """The stage ``name`` belongs to a replaced plan: drain it if it holds requests, else stop it."""
        actor = self._actors.get(name)
        if actor is not None and actor.open_requests > 0:
            for older in list(self._draining):  # one replaced plan drains at a time: older ones fail over
                await self._stop(older, failing=f"plan {epoch} replaced it")
            self._draining.add(name)
            log.info("%s: %s drains %d running requests", self.node_id, name, actor.open_requests)
            return
        await self._stop(name)

    async def _stop(self, name: str, failing: str | None = None) -> None:
        """Stop child ``name``; with ``failing``, first tell the owners of its requests why they fail here."""
        self._draining.discard(name)
        actor = self._actors.pop(name, None)
        for epoch in [e for e, n in self._routes.items() if n == name]:
            del self._routes[epoch]
        if failing is not None and actor is not None:
            for rid, owner, epoch in actor.request_owners():
                failure = StageFailure(request_id=rid, node_id=self.node_id, detail=failing, plan_epoch=epoch)
                try:
                    await self.send(owner, failure)
                except (ConnectionError, TimeoutError) as exc:
                    log.warning("%s: could not tell %s that %s fails: %r", self.node_id, owner, rid, exc)
        with contextlib.suppress(KeyError):  # never started, or the supervisor gave up on it
            await self.supervisor.terminate_child(name, timeout=30.0)

    def replace_supervisor(self, supervisor: Supervisor) -> None:
        """The old supervisor gave up (its stages are gone with it): hold stages under ``supervisor`` from now on."""
        self.restarts_before += self.supervisor.statistics().child_restarts
        self.supervisor = supervisor
        self.actor, self.current, self._child = None, None, None
        self._actors.clear()
        self._routes.clear()
        self._draining.clear()

    @property
    def restarts(self) -> int:
        """Restarts of this node's stage over every supervisor it had."""
        return self.restarts_before + self.supervisor.statistics().child_restarts

    def owner_gone(self, owner: str) -> int:
        """``owner``'s node is gone: close every request it owned on this node's stages (no orphaned caches).
        Returns how many were closed."""
        closed = 0
        for name, actor in list(self._actors.items()):
            ref = self.supervisor.child_ref(name)
            if ref is None:
                continue
            for rid, request_owner, _ in actor.request_owners():
                if request_owner == owner:
                    try:
                        ref.tell_nowait(RequestClose(request_id=rid, reason=f"owner {owner} is gone"))
                        closed += 1
                    except MailboxFull:
                        log.error("%s: cannot close %s of the gone owner %s: mailbox full", self.node_id, rid, owner)
        return closed

    async def deliver(self, message: Any) -> bool:
        if isinstance(message, RequestClose | ResendTokens):
            # No epoch on these: the current stage and every draining one get them (unknown ids are ignored).
            delivered = await self._deliver_current(message)
            for name in list(self._draining):
                actor, ref = self._actors.get(name), self.supervisor.child_ref(name)
                if actor is None or ref is None:
                    continue
                await ref.ask(message, timeout=30.0)
                delivered = True
                if actor.open_requests == 0 and name in self._draining:
                    log.info("%s: %s drained", self.node_id, name)
                    await self._stop(name)
            return delivered
        route = self._routes.get(message.plan_epoch)
        if route is not None and route != self._child:
            ref = self.supervisor.child_ref(route)
            if ref is None:
                return False
            await ref.tell(message, timeout=30.0)
            return True
        return await self._deliver_current(message)

    async def _deliver_current(self, message: Any) -> bool:
        name = self._child
        if name is None:
            return False
        ref = self.supervisor.child_ref(name)
        if ref is None and self.current is not None:
            # This node holds a stage of the plan and its supervisor is restarting it: wait for the restart
            # (or for the supervisor to give up) rather than refuse the message.
            try:
                await self.supervisor.wait_idle(timeout=self.options.load_timeout_s)
            except (ActorDead, TimeoutError) as exc:
                log.warning("%s: the stage is not coming back: %r", self.node_id, exc)
                return False
            ref = self.supervisor.child_ref(name)
        if ref is None:
            return False
        await ref.tell(message, timeout=30.0)
        return True

    def snapshot(self) -> dict[str, Any] | None:
        if self.actor is None:
            return None
        return self.actor.snapshot() | {
            "epoch": None if self.current is None else self.current[0],
            "draining": sorted(self._draining),
        }


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
        self.suspects: dict[str, tuple[float, str]] = {}  # node id: (until, on monotonic time; why)
        self._round_barrier: DistributedBarrier | None = None
        self._loads: set[asyncio.Task[None]] = set()  # plan loads in progress (owned by run's TaskGroup)
        self._pulse = asyncio.Event()  # set (and replaced) on every commit, membership change and suspect change
        self._lost_member = False  # a member left since the planning loop last woke: re-plan without settling

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
            self._lost_member = True
        else:
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

    # -- the leader's planning loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            while not stop.is_set():
                try:
                    async with asyncio.timeout(_POLL_S):
                        await self._changed.wait()
                except TimeoutError:
                    if not self._expire_suspects():
                        continue
                    self._notify()
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

    def healthy(self, plan: PlanCommit) -> bool:
        """Every stage of ``plan`` is a live member, and none is suspect."""
        suspects = self.active_suspects()
        return all(s.node_id in self.members and s.node_id not in suspects for s in plan.stages)

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
            log.info("%s: split %s waits for %d nodes (%d so far)", self.node_id, split, len(split), len(usable))
            return None
        footprint = footprint_from_spec(self.source.spec, self.options.bytes_per_param)
        nodes = [NodeResources(m.node_id, m.memory_bytes) for m in usable]
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
            self._round_barrier = barrier
            try:
                for node in sorted(members):
                    await self.send(node, proposal)
                result = await barrier.sync_with_timeout(self.options.load_timeout_s, self.options.plan_retries)
            finally:
                self._round_barrier = None
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

    async def handle(self, sender: str, message: PlanProposal | StageStatus | PlanCommit | SuspectNode) -> None:
        match message:
            case SuspectNode():
                self.record_suspect(message.node_id, f"{message.reason} (from {message.reporter})", message.ttl_s)
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
                load = self._tg.create_task(self._load(sender, message), name=f"load plan {message.epoch}")
                self._loads.add(load)
                load.add_done_callback(self._loads.discard)
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
                self._notify()
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
