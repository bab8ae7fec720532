"""One exo-stable node: the OpenAI API, its peers, its stage of the pipeline, until told to stop.

The actor tree of a node::

    ActorSystem
     ├─ barriers  BarrierActor      named barriers (plan loads, request starts)
     └─ stages    Supervisor        the StageActor of this node's layers, restarted on a crash

beside them the PeerManager (links and membership), the Coordinator (placement and plan commits) and the
PipelineOwner (requests owned here), all owned by the node's TaskGroup. A node alone is a one-stage
pipeline over the same code path; more nodes split the layers between them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from actors import ActorSystem, Strategy, Supervisor
from exo_stable.api.guards import ApiRunner
from exo_stable.api.metrics import NodeCollector
from exo_stable.api.server import METRICS_KEY, create_app, json_response
from exo_stable.cluster import addresses as addr
from exo_stable.cluster.coordinator import Coordinator
from exo_stable.cluster.exposure import interface_ips, is_ip, peer_addresses, say_who_may_join
from exo_stable.cluster.peers import PeerManager
from exo_stable.cluster.roles import (
    MAX_DIRECTORY,
    Bounds,
    Refusals,
    activation_refusal,
    request_open_refusal,
    step_refusal,
    token_refusal,
)
from exo_stable.cluster.stagehost import ClusterOptions, StageHost
from exo_stable.engine.loader import ModelSource, open_model
from exo_stable.logs import safe
from exo_stable.node.cluster_service import ClusterService
from exo_stable.node.config import BYTES_PER_PARAM, NodeConfig, available_memory, serving_dtype
from exo_stable.pipeline.barrier import BarrierActor, Barriers
from exo_stable.pipeline.fallback import FallbackCoordinator
from exo_stable.pipeline.levels import AdaptiveConfig, IntegrityCounters
from exo_stable.pipeline.owner import OwnerConfig, PipelineOwner
from exo_stable.pipeline.recovery import FailureKind
from exo_stable.wire.handshake import Identity, PeerInfo, new_session_id
from exo_stable.wire.messages import (
    ActivationChunk,
    BarrierArrive,
    Message,
    PeerAddress,
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
from exo_stable.wire.peerlink import WIRE_PATH, LinkConfig

log = logging.getLogger(__name__)


class Node:
    """Wires the parts of a node together and routes every incoming message to its handler."""

    def __init__(self, config: NodeConfig, source: ModelSource) -> None:
        self.config = config
        self.source = source
        self.node_id = config.node_id or f"{socket.gethostname()}-{config.port or secrets.token_hex(3)}"
        self.memory_bytes = config.memory_bytes or available_memory()
        self.context_length = min(config.max_context or source.spec.context_length, source.spec.context_length)
        self.unexpected = 0
        self._peers_ready = asyncio.Event()
        self._directory_changed = asyncio.Event()
        self.port = config.port
        self._interface_ips: list[str] = []
        self.options = ClusterOptions(
            split=config.split,
            max_stages=config.max_stages,
            max_requests=config.max_concurrent * 2,
            bytes_per_param=BYTES_PER_PARAM[config.dtype],
            footprint=source.footprint(config.dtype, kv_tokens=config.max_concurrent * self.context_length),
            decode_ahead=config.decode_ahead,
            build_ahead=config.build_ahead,
            max_batch=config.max_batch,
            suspect_ttl_s=config.suspect_ttl_s,
        )
        # Built in run(), once the actor system is up:
        self.peers: PeerManager
        self.coordinator: Coordinator
        self.stage_host: StageHost
        self.owner: PipelineOwner
        self.barriers: Barriers
        self.fallback: FallbackCoordinator
        self.escalations = 0
        self.refusals = Refusals(self.node_id)
        spec = source.spec
        self.bounds = Bounds(context_length=spec.context_length, vocab_size=spec.vocab_size)
        self.slots_per_owner = self.options.max_requests_per_owner
        self._escalated: asyncio.Queue[BaseException] = asyncio.Queue(maxsize=16)

    def _stage_supervisor(self) -> StageSupervisor:
        return StageSupervisor(
            "stages",
            on_escalate=self._on_escalate,
            max_restarts=self.config.stage_max_restarts,
            period_s=self.config.stage_restart_period_s,
        )

    def _on_escalate(self, exc: BaseException) -> None:
        """The stage supervisor gave up (a crash loop past its restart intensity): handled by _supervise."""
        try:
            self._escalated.put_nowait(exc)
        except asyncio.QueueFull:
            log.error("%s: escalation dropped, 16 already waiting: %r", self.node_id, exc)

    async def _supervise(self, system: ActorSystem, stop: asyncio.Event) -> None:
        """Escalations from the stage supervisor reach the RecoveryManager: it classifies them (persistent),
        this node is marked suspect cluster-wide (plans leave it out; its stage is gone), and a fresh stage
        supervisor takes the old one's place for the plans to come."""
        while not stop.is_set():
            try:
                async with asyncio.timeout(5.0):
                    exc = await self._escalated.get()
            except TimeoutError:
                continue
            self.escalations += 1
            recovery = self.owner.recovery
            event = recovery.event(FailureKind.STAGE_ESCALATED, self.node_id, tuple(self.owner.requests), repr(exc))
            decision = recovery.classify(event)
            log.error(
                "%s: the stage supervisor gave up (%r): %s, %s",
                self.node_id,
                exc,
                decision.failure_class,
                decision.mechanism,
            )
            supervisor = self._stage_supervisor()
            await system.spawn(supervisor, name=f"stages-{self.escalations}")
            self.stage_host.replace_supervisor(supervisor)
            await self.coordinator.mark_suspect(self.node_id, decision.reason)

    async def dispatch(self, sender: str, message: Message) -> None:
        """Route a peer's message to its handler if the sender holds the role it needs (cluster/roles.py)."""
        if sender != self.node_id and sender not in self.coordinator.members:
            self.refusals.refuse(sender, "not_a_member", message)
            return
        refusal = self._refusal(sender, message)
        if refusal is not None:
            self.refusals.refuse(sender, refusal, message)
            if isinstance(message, RequestOpen) and sender == message.owner:
                # The owner's request fails now, not at its open deadline.
                no = BarrierArrive(name=message.barrier, member=self.node_id, ok=False, detail=f"refused: {refusal}")
                await self.send(message.owner, no)
            return
        match message:
            case PlanProposal() | StageStatus() | PlanCommit() | SuspectNode():
                await self.coordinator.handle(sender, message)
            case PeerDirectory(peers=entries):
                candidates: dict[str, list[addr.Address]] = {}
                for entry in entries:
                    candidates.setdefault(entry.node_id, []).append((entry.host, entry.port))
                connected = self.peers.connected_peers()
                for node_id, found in candidates.items():
                    if node_id != self.node_id and node_id not in connected:
                        self.peers.dial_any(node_id, addr.dial_candidates(found))
            case BarrierArrive():
                await self.barriers.arrive(message)
            case TokenChunk() | StageFailure():
                self.owner.deliver(message)
            case RequestOpen():
                if not await self.stage_host.deliver(message):
                    no = BarrierArrive(name=message.barrier, member=self.node_id, ok=False, detail="no stage loaded")
                    await self.send(message.owner, no)
            case StepInput() | ActivationChunk() | RequestClose() | ResendTokens():
                if not await self.stage_host.deliver(message):
                    self.unexpected += 1
            case _:
                self.unexpected += 1
                log.warning("%s: unexpected %s from %s", self.node_id, type(message).__name__, safe(sender))

    def _plan_stages(self, epoch: int) -> tuple[StageRange, ...] | None:
        plan = self.coordinator.history.plans.get(epoch)
        return plan.stages if plan is not None else self.stage_host.stages_of(epoch)

    def _refusal(self, sender: str, message: Message) -> str | None:
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
                plans = (
                    [self.coordinator.history.plans.get(epoch)]
                    if epoch != -1
                    else self.coordinator.history.plans.values()
                )
                if node != sender or not any(p is not None and sender in {s.node_id for s in p.stages} for p in plans):
                    return "failure_not_from_stage"
                return None
            case RequestOpen():
                stages = host.stages_of(message.plan_epoch)
                if stages is None or all(s.node_id != self.node_id for s in stages):
                    return "request_open_without_stage"
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

    def _on_membership(self, peer: PeerInfo | str, up: bool) -> None:
        self.coordinator.on_membership(peer, up)
        if up:
            self._directory_changed.set()
        else:
            node = peer if isinstance(peer, str) else peer.node_id
            self.owner.on_peer_down(node)
            closed = self.stage_host.owner_gone(node)
            if closed:
                log.warning("%s: closed %d requests of %s, which is gone", self.node_id, closed, node)

    def addresses(self) -> list[addr.Address]:
        """Where peers should dial this node, best first: never a wildcard (see cluster/addresses.py)."""
        config = self.config
        advertise = None
        if config.advertise is not None:
            host, port = config.advertise
            advertise = (host, self.port if port is None else port)
        return addr.advertised_addresses(
            config.host,
            self.port,
            advertise=advertise,
            reached_on=self.peers.reached_on,
            interface_ips=self._interface_ips,
        )

    def peer_addresses(self, node_id: str, info: PeerInfo) -> list[addr.Address]:
        return peer_addresses(self.peers, node_id, info)

    def directory(self) -> PeerDirectory:
        """This node and every peer it knows, with the addresses each one can be dialed on."""
        entries = [PeerAddress(self.node_id, h, p) for h, p in self.addresses()]
        for node_id, info in self.peers.connected_peers().items():
            entries += [PeerAddress(node_id, h, p) for h, p in self.peer_addresses(node_id, info)]
        return PeerDirectory(peers=tuple(entries))

    async def _gossip(self, stop: asyncio.Event) -> None:
        """Tell every peer about every other one whenever someone joins, so that members form a full mesh."""
        while not stop.is_set():
            try:
                async with asyncio.timeout(5.0):
                    await self._directory_changed.wait()
            except TimeoutError:
                continue
            self._directory_changed.clear()
            if stop.is_set():
                return
            directory = self.directory()
            for node_id in list(self.peers.connected_peers()):
                try:
                    await self.peers.send(node_id, directory, timeout=5.0)
                except (ConnectionError, TimeoutError) as exc:
                    log.info("%s: could not send the peer directory to %s: %r", self.node_id, node_id, exc)

    async def send(self, node_id: str, message: Message) -> None:
        await self.peers.send(node_id, message)

    def integrity_counters(self) -> IntegrityCounters:
        """What adaptive strictness reads: the owner's findings plus this node's links' corrupt frames and
        retransmits."""
        own = self.owner.own_integrity()
        corrupt = retransmits = 0
        for peer in self.peers.statistics().values():
            links = peer.get("links", {}) if isinstance(peer, dict) else {}
            for link in links.values():
                corrupt += int(link.get("corrupt_frames", 0))
                retransmits += int(link.get("retransmissions", 0))
        return IntegrityCounters(corruptions=own.corruptions + corrupt, retransmits=own.retransmits + retransmits)

    def cluster_view(self) -> dict[str, Any]:
        plan = self.coordinator.active
        layers = {s.node_id: [s.start, s.end] for s in plan.stages} if plan else {}
        peers = self.peers.connected_peers()
        nodes = []
        for node_id in sorted(self.coordinator.members):
            info = peers.get(node_id)
            found = self.addresses() if info is None else self.peer_addresses(node_id, info)
            shown = [addr.format_host_port(h, p) for h, p in found]
            health = "alive" if node_id == self.node_id else self.peers.monitor.state(node_id).value
            memory = info.memory_bytes if info else self.memory_bytes if node_id == self.node_id else None
            nodes.append(
                {
                    "id": node_id,
                    "address": shown[0] if shown else None,
                    "addresses": shown,
                    "health": health,
                    "layers": layers.get(node_id),
                    "memory_bytes": memory,
                }
            )
        return {
            "node_id": self.node_id,  # the node that answered
            "nodes": nodes,
            "refused": dict(self.peers.refused),
            "plan": None
            if plan is None
            else {
                "epoch": plan.epoch,
                "leader": plan.leader,
                "model_fingerprint": plan.model_fingerprint,
                "stages": [{"node_id": s.node_id, "start": s.start, "end": s.end} for s in plan.stages],
            },
        }

    async def run(
        self, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None, handle_signals: bool = True
    ) -> None:
        """Run until ``stop`` is set (or SIGINT/SIGTERM arrives, when ``handle_signals``)."""
        config = self.config
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            async with ActorSystem(f"node {self.node_id}", shutdown_timeout=30.0) as system:
                self.barriers = Barriers(await system.spawn(BarrierActor(), name="barriers"))
                stages = self._stage_supervisor()
                await system.spawn(stages, name="stages")
                self.stage_host = StageHost(
                    self.source,
                    dtype=config.dtype,
                    node_id=self.node_id,
                    send=self.send,
                    supervisor=stages,
                    options=self.options,
                )
                self.coordinator = Coordinator(
                    self.node_id,
                    source=self.source,
                    memory_bytes=self.memory_bytes,
                    send=self.send,
                    stage_host=self.stage_host,
                    barriers=self.barriers,
                    options=self.options,
                    refusals=self.refusals,
                )
                self.fallback = FallbackCoordinator(
                    self.source,
                    node_id=self.node_id,
                    dtype=config.dtype,
                    memory_bytes=self.memory_bytes,
                    bytes_per_param=self.options.bytes_per_param,
                    footprint=self.options.footprint,
                )
                self.owner = PipelineOwner(
                    self.node_id,
                    tokenizer=self.source.tokenizer,
                    send=self.send,
                    plan=lambda: self.coordinator.active,
                    barriers=self.barriers,
                    wait_plan=self.coordinator.wait_recoverable,
                    healthy=self.coordinator.healthy,
                    config=OwnerConfig(
                        replay=config.replay,
                        validation=config.validation,
                        spot_check_fraction=config.spot_check_fraction,
                        adaptive=AdaptiveConfig(enabled=config.adaptive_validation),
                    ),
                    fallback=self.fallback,
                    on_suspect=self.coordinator.mark_suspect,
                )
                self.coordinator.on_commit = self.owner.on_plan_committed
                self.owner.integrity = self.integrity_counters
                try:
                    await self._serve(stop, ready, system)
                finally:
                    self.fallback.close()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _serve(self, stop: asyncio.Event, ready: asyncio.Event | None, system: ActorSystem) -> None:
        config = self.config
        service = ClusterService(self, max_active=config.max_concurrent, max_queue=config.max_queue)
        app = create_app(service, config.api)
        app[METRICS_KEY].register(NodeCollector(self))
        app.router.add_get("/v1/cluster", self._cluster_route)
        app.router.add_get(WIRE_PATH, self._wire_route)
        runner = ApiRunner(
            app,
            header_timeout_s=config.api.header_timeout_s,
            shutdown_timeout=config.shutdown_timeout_s,
            access_log=None,
            handle_signals=False,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            await site.start()
            port = int(runner.addresses[0][1]) if runner.addresses else config.port
            self.port = port
            self._interface_ips = interface_ips() if addr.is_wildcard(config.host) else []
            advertised = addr.advertised_addresses(
                config.host,
                port,
                advertise=None if config.advertise is None else (config.advertise[0], config.advertise[1] or port),
                interface_ips=self._interface_ips,
            )
            self.identity = Identity(
                node_id=self.node_id,
                session_id=new_session_id(),
                capabilities=("mlx", *addr.api_capabilities(advertised)),
                memory_bytes=self.memory_bytes,
                model_fingerprint=self.source.fingerprint,
            )
            self.peers = PeerManager(
                self.identity,
                dispatch=self.dispatch,
                on_membership=self._on_membership,
                secret=config.cluster_secret,
                config=LinkConfig.from_env(
                    heartbeat_interval_s=config.peer_timeout_s / 4, heartbeat_timeout_s=config.peer_timeout_s
                ),
                forget_after_s=config.peer_forget_s,
            )
            self.coordinator.wait_links = self.peers.wait_connected_to
            say_who_may_join(
                config.host,
                port,
                api_key=config.api.api_key,
                auth=config.cluster_auth,
                secret=config.cluster_secret,
                secret_path=config.cluster_secret_path,
                seed=self.addresses()[0],
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.peers.run(stop), name="peers")
                tg.create_task(self.coordinator.run(stop), name="coordinator")
                tg.create_task(self._gossip(stop), name="gossip")
                tg.create_task(self._supervise(system, stop), name="supervise")
                await self.peers.wait_ready(timeout=10.0)
                self._peers_ready.set()
                for host, peer_port in config.peers:
                    if (host, peer_port) != (config.host, port):
                        self.peers.dial(host, peer_port)
                if config.discovery:
                    tg.create_task(self._discover(port, stop), name="discovery")
                tg.create_task(self._announce(port, ready, stop), name="announce")
                await stop.wait()
                # Wake the loops that wait for changes so they see the stop now, not at their next deadline.
                self._directory_changed.set()
                self.coordinator.wake()
                print("exo-stable: shutting down", file=sys.stderr, flush=True)
        finally:
            await runner.cleanup()

    async def _announce(self, port: int, ready: asyncio.Event | None, stop: asyncio.Event) -> None:
        """Print the ready line once this node's first plan is committed (the model is loaded)."""
        while not stop.is_set():
            try:
                plan = await self.coordinator.wait_plan(timeout=5.0)
                break
            except TimeoutError:
                continue
        else:
            return
        print(
            f"exo-stable: serving {self.source.name} ({self.config.dtype})"
            f" on http://{addr.format_host_port(self.config.host, port)}/v1"
            f" as {self.node_id}, plan {plan.epoch}: "
            + " ".join(f"{s.node_id}[{s.start},{s.end})" for s in plan.stages),
            flush=True,
        )
        if ready is not None:
            ready.set()

    async def _discover(self, port: int, stop: asyncio.Event) -> None:
        from exo_stable.cluster.discovery import Discovery
        from exo_stable.wire.messages import PROTOCOL_VERSION

        # Advertise only on the interfaces this node is bound to, and only addresses peers can dial.
        bound = self.config.host
        interfaces = None if addr.is_wildcard(bound) else [bound]
        hosts = [h for h, _ in self.addresses() if addr.is_dialable(h) and is_ip(h)]
        async with Discovery(
            self.node_id,
            port,
            protocol_version=PROTOCOL_VERSION,
            model_fingerprint=self.source.fingerprint,
            memory_bytes=self.memory_bytes,
            interfaces=interfaces,
            addresses=hosts or None,
            ipv6=bound == "::" or ":" in bound,
        ) as discovery:
            while not stop.is_set():
                try:
                    event = await discovery.next_event(timeout=5.0)
                except TimeoutError:
                    continue
                if event.kind in ("found", "updated") and event.peer.model_fingerprint == self.source.fingerprint:
                    self.peers.dial(event.peer.host, event.peer.port, keep=False)

    async def wait_listening(self, timeout: float) -> int:  # noqa: ASYNC109
        """Wait until the API and wire routes accept connections; returns the port."""
        async with asyncio.timeout(timeout):
            await self._peers_ready.wait()
        return self.port

    async def _wire_route(self, request: web.Request) -> web.StreamResponse:
        async with asyncio.timeout(10.0):
            await self._peers_ready.wait()  # a peer may dial in before this node's links are set up
        return await self.peers.handle(request)

    async def _cluster_route(self, request: web.Request) -> web.Response:
        return json_response(self.cluster_view())


class StageSupervisor(Supervisor):
    """The supervisor of a node's stage (one_for_one): past its restart intensity it crashes, as any
    supervisor does, and ``on_escalate`` hands the reason to the node (which re-plans without itself)."""

    def __init__(
        self, name: str, *, on_escalate: Callable[[BaseException], None], max_restarts: int, period_s: float
    ) -> None:
        super().__init__(name, [], strategy=Strategy.ONE_FOR_ONE, max_restarts=max_restarts, period_s=period_s)
        self._on_escalate = on_escalate

    async def on_failure(self, exc: BaseException) -> None:
        self._on_escalate(exc)


async def serve(config: NodeConfig, *, ready: asyncio.Event | None = None) -> None:
    """Load the model, join the cluster, serve the API; stop cleanly on SIGINT/SIGTERM."""
    from exo_stable.engine.device import chosen  # chosen by the command line before serving

    source = open_model(config.model)
    if config.dtype_auto:
        config = replace(config, dtype=serving_dtype(source, config))
    source.check_dtype(config.dtype, chosen())
    await Node(config, source).run(ready=ready)


__all__ = ["ClusterService", "Node", "NodeConfig", "StageSupervisor", "available_memory", "serve", "serving_dtype"]
