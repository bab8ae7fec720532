"""StageHost: keeps this node's StageActor (under a supervisor) in line with the plans it is asked to load.

It also knows, for the role checks of the dispatcher, which plans' stages it holds and who owns each
request on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from actors import ActorDead, ChildSpec, MailboxFull, Restart, Supervisor
from exo_stable.engine.batching import BatchMode
from exo_stable.engine.loader import ModelSource
from exo_stable.engine.modelspec import Dtype
from exo_stable.pipeline.placement import ModelFootprint
from exo_stable.pipeline.stage import Send, StageActor, StageConfig
from exo_stable.pipeline.stagestate import StageStatistics
from exo_stable.wire.messages import RequestClose, ResendTokens, StageFailure, StageRange

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    split: tuple[int, ...] | None = None
    max_stages: int | None = None
    settle_s: float = 0.3
    load_timeout_s: float = 600.0
    plan_retries: int = 1
    max_requests: int = 16
    bytes_per_param: float = 4.0
    footprint: ModelFootprint | None = None  # the model's real bytes (loader.ModelSource.footprint); else estimated
    suspect_ttl_s: float = 60.0
    decode_ahead: bool = True  # a stage holding the whole model queues greedy steps ahead (StageConfig)
    build_ahead: bool = True  # stages build each decode step's graph while the others compute (StageConfig)
    batch: BatchMode = BatchMode.EXACT  # how stages batch decode steps (StageConfig)
    batch_limit: int = 16

    @property
    def max_requests_per_owner(self) -> int:
        """One owner node may hold this many of a stage's request slots, so that the others always have some."""
        return max(1, self.max_requests * 3 // 4)


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
        self._plans: dict[int, tuple[StageRange, ...]] = {}  # plan epoch: its stages (epochs in _routes)
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
            self._plans[epoch] = stages
            return 0.0
        old = self._child
        # The new stage takes over the layers the replaced one built (the first incarnation only: a restart
        # after a crash builds afresh).
        keep = [] if old is None or (replaced := self._actors.get(old)) is None else [replaced]
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
            max_requests_per_owner=self.options.max_requests_per_owner,
            load_timeout_s=self.options.load_timeout_s,
            decode_ahead=self.options.decode_ahead,
            build_ahead=self.options.build_ahead,
            batch=self.options.batch,
            batch_limit=self.options.batch_limit,
            max_queued_steps=4 * self.options.max_requests,
        )
        started = time.perf_counter()
        name = f"stage-{epoch}"

        def factory() -> StageActor:
            actor = StageActor(self.source, config, self.send, keep=keep.pop() if keep else None)
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
        self._plans[epoch] = stages
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
            self._plans.pop(epoch, None)
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
        self._plans.clear()
        self._draining.clear()

    def stages_of(self, epoch: int) -> tuple[StageRange, ...] | None:
        """The stages of plan ``epoch`` when this node holds a stage of it (loaded, committed or draining)."""
        return self._plans.get(epoch)

    def owner_of(self, request_id: str) -> str | None:
        """The node that opened ``request_id`` on one of this node's stages, or None."""
        for actor in self._actors.values():
            owner = actor.owner_of(request_id)
            if owner is not None:
                return owner
        return None

    def requests_of(self, owner: str) -> int:
        """Requests ``owner`` holds open on this node's current stage."""
        actor = self.actor
        return 0 if actor is None else sum(1 for _, o, _ in actor.request_owners() if o == owner)

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

    def statistics(self) -> StageStatistics | None:
        """This node's current stage, with its plan's epoch and the stages still draining; None without one."""
        if self.actor is None:
            return None
        epoch = None if self.current is None else self.current[0]
        return replace(self.actor.stage_statistics(), epoch=epoch, draining=tuple(sorted(self._draining)))
