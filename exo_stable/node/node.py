"""One exo-stable node: the OpenAI API, its peers, its stage of the pipeline, until told to stop.

The actor tree of a node::

    ActorSystem
     ├─ barriers  BarrierActor      named barriers (plan loads, request starts)
     └─ stages    Supervisor        the StageActor of this node's layers, restarted on a crash

beside them the PeerManager (links and membership), the Coordinator (placement and plan commits), the
PipelineOwner (requests owned here), Gossip (the peer directory) and the MessageRouter (each peer message to
its receiver, by type), all built by :meth:`Node.assemble` and run by the node's TaskGroup. A node alone is a
one-stage pipeline over the same code path; more nodes split the layers between them.
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
from exo_stable.cluster.exposure import interface_ips, is_ip, say_who_may_join
from exo_stable.cluster.gossip import Gossip
from exo_stable.cluster.peers import PeerManager
from exo_stable.cluster.roles import Bounds, Refusals
from exo_stable.cluster.router import MessageRouter
from exo_stable.cluster.stagehost import ClusterOptions, StageHost
from exo_stable.engine.loader import ModelSource, open_model
from exo_stable.node import watchdog
from exo_stable.node.alone import ModelTooLarge, watch_alone
from exo_stable.node.cluster_service import ClusterService
from exo_stable.node.config import BYTES_PER_PARAM, NodeConfig, available_memory, serving_dtype
from exo_stable.node.parts import NodeParts
from exo_stable.pipeline.barrier import BarrierActor, Barriers
from exo_stable.pipeline.fallback import FallbackCoordinator
from exo_stable.pipeline.levels import AdaptiveConfig, IntegrityCounters
from exo_stable.pipeline.owner import OwnerConfig, PipelineOwner
from exo_stable.pipeline.recovery import FailureKind
from exo_stable.pipeline.statistics import NodeStatistics
from exo_stable.wire.handshake import Identity, new_session_id
from exo_stable.wire.linkconfig import PeersStatistics
from exo_stable.wire.messages import Message
from exo_stable.wire.peerlink import WIRE_PATH, LinkConfig

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0
"""How long a stopping node waits for its tasks to end before it cancels (and names) the rest."""


class Node:
    """One node: what its configuration implies at once, then (in :meth:`run`) its parts, built by
    :meth:`assemble` from the config and the port it listens on, serving until told to stop."""

    def __init__(self, config: NodeConfig, source: ModelSource) -> None:
        self.config = config
        self.source = source
        self.node_id = config.node_id or f"{socket.gethostname()}-{config.port or secrets.token_hex(3)}"
        self.memory_bytes = config.memory_bytes or available_memory()
        self.context_length = min(config.max_context or source.spec.context_length, source.spec.context_length)
        self.gave_up: str | None = None  # why this node stopped on its own (node/alone.py)
        self._peers_ready = asyncio.Event()
        self.port = config.port
        self.options = ClusterOptions(
            split=config.split,
            max_stages=config.max_stages,
            max_requests=config.max_concurrent * 2,
            bytes_per_param=BYTES_PER_PARAM[config.dtype],
            footprint=source.footprint(config.dtype, kv_tokens=config.max_concurrent * self.context_length),
            decode_ahead=config.decode_ahead,
            build_ahead=config.build_ahead,
            batch=config.batch,
            batch_limit=config.batch_limit,
            suspect_ttl_s=config.suspect_ttl_s,
        )
        self.escalations = 0
        self.refusals = Refusals(self.node_id)
        spec = source.spec
        self.bounds = Bounds(context_length=spec.context_length, vocab_size=spec.vocab_size)
        self.slots_per_owner = self.options.max_requests_per_owner
        self._escalated: asyncio.Queue[BaseException] = asyncio.Queue(maxsize=16)
        self._parts: NodeParts | None = None

    # -- the parts, once run() built them --------------------------------------------------------------

    @property
    def parts(self) -> NodeParts:
        assert self._parts is not None, "the node is not running"
        return self._parts

    @property
    def peers(self) -> PeerManager:
        return self.parts.peers

    @property
    def coordinator(self) -> Coordinator:
        return self.parts.coordinator

    @property
    def stage_host(self) -> StageHost:
        return self.parts.stage_host

    @property
    def owner(self) -> PipelineOwner:
        return self.parts.owner

    @property
    def fallback(self) -> FallbackCoordinator:
        return self.parts.fallback

    async def assemble(self, system: ActorSystem, port: int) -> NodeParts:
        """Build every part of this node, each from what it needs, in dependency order: links first (every
        other part sends through them), then the stage host, the coordinator, the fallback, the request
        owner, gossip, and the router that hands each peer message to its receiver."""
        config, source, node_id = self.config, self.source, self.node_id
        barriers = Barriers(await system.spawn(BarrierActor(), name="barriers"))
        stages = self._stage_supervisor()
        await system.spawn(stages, name="stages")
        interfaces = interface_ips() if addr.is_wildcard(config.host) else []
        advertised = addr.advertised_addresses(
            config.host,
            port,
            advertise=None if config.advertise is None else (config.advertise[0], config.advertise[1] or port),
            interface_ips=interfaces,
        )
        identity = Identity(
            node_id=node_id,
            session_id=new_session_id(),
            capabilities=("mlx", *addr.api_capabilities(advertised)),
            memory_bytes=self.memory_bytes,
            model_fingerprint=source.fingerprint,
        )
        peers = PeerManager(
            identity,
            secret=config.cluster_secret,
            config=LinkConfig.from_env(
                heartbeat_interval_s=config.peer_timeout_s / 4, heartbeat_timeout_s=config.peer_timeout_s
            ),
            forget_after_s=config.peer_forget_s,
        )
        stage_host = StageHost(
            source, dtype=config.dtype, node_id=node_id, send=peers.send, supervisor=stages, options=self.options
        )
        coordinator = Coordinator(
            node_id,
            source=source,
            memory_bytes=self.memory_bytes,
            send=peers.send,
            stage_host=stage_host,
            barriers=barriers,
            options=self.options,
            wait_links=peers.wait_connected_to,
            refusals=self.refusals,
        )
        fallback = FallbackCoordinator(
            source,
            node_id=node_id,
            dtype=config.dtype,
            memory_bytes=self.memory_bytes,
            bytes_per_param=self.options.bytes_per_param,
            footprint=self.options.footprint,
        )
        owner = PipelineOwner(
            node_id,
            tokenizer=source.tokenizer,
            send=peers.send,
            plans=coordinator,
            barriers=barriers,
            config=OwnerConfig(
                replay=config.replay,
                validation=config.validation,
                spot_check_fraction=config.spot_check_fraction,
                adaptive=AdaptiveConfig(enabled=config.adaptive_validation),
            ),
            fallback=fallback,
            link_integrity=lambda: link_integrity(peers.statistics()),
        )
        gossip = Gossip(
            node_id, peers=peers, host=config.host, port=port, advertise=config.advertise, interface_ips=interfaces
        )
        router = MessageRouter(
            node_id,
            coordinator=coordinator,
            stage_host=stage_host,
            owner=owner,
            barriers=barriers,
            gossip=gossip,
            send=peers.send,
            refusals=self.refusals,
            bounds=self.bounds,
            slots_per_owner=self.slots_per_owner,
        )
        return NodeParts(peers, barriers, stage_host, coordinator, fallback, owner, gossip, router)

    # -- supervision -----------------------------------------------------------------------------------

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
        """Hand a peer's message to the router (as the links do)."""
        await self.parts.router.dispatch(sender, message)

    # -- what the node reports -------------------------------------------------------------------------

    def statistics(self) -> NodeStatistics:
        """One typed snapshot of everything this node reports (``/health``, ``/metrics``, ``/v1/cluster``)."""
        parts = self.parts
        return NodeStatistics(
            node_id=self.node_id,
            cluster=parts.coordinator.statistics(),
            peers=parts.peers.statistics(),
            owner=parts.owner.statistics(),
            stage=parts.stage_host.statistics(),
            refusals=dict(self.refusals.by_kind),
            escalations=self.escalations,
            stage_restarts=parts.stage_host.restarts,
        )

    def cluster_view(self) -> dict[str, Any]:
        """``/v1/cluster``: the members (addresses, health, layers, memory), the refused peers and the plan."""
        stats, gossip = self.statistics(), self.parts.gossip
        plan = stats.cluster.plan
        layers = {s.node_id: [s.start, s.end] for s in plan.stages} if plan else {}
        peers = self.peers.connected_peers()
        nodes = []
        for node_id in sorted(stats.cluster.members):
            info = peers.get(node_id)
            found = gossip.addresses() if info is None else gossip.peer_addresses(node_id, info)
            shown = [addr.format_host_port(h, p) for h, p in found]
            health = "alive" if node_id == self.node_id else stats.peers.health(node_id) or "unknown"
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
            "refused": dict(stats.peers.refused),
            "plan": None
            if plan is None
            else {
                "epoch": plan.epoch,
                "leader": plan.leader,
                "model_fingerprint": plan.model_fingerprint,
                "stages": [{"node_id": s.node_id, "start": s.start, "end": s.end} for s in plan.stages],
            },
        }

    # -- running ---------------------------------------------------------------------------------------

    async def run(
        self, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None, handle_signals: bool = True
    ) -> None:
        """Run until ``stop`` is set (or SIGINT/SIGTERM arrives, when ``handle_signals``)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._stop_signal, stop, loop)
        sockets = listen(self.config.host, self.config.port)  # the port first: peers are told where to dial
        try:
            self.port = int(sockets[0].getsockname()[1])
            async with ActorSystem(f"node {self.node_id}", shutdown_timeout=30.0) as system:
                self._parts = await self.assemble(system, self.port)
                try:
                    await self._serve(stop, ready, system, sockets)
                finally:
                    self._parts.fallback.close()
        finally:
            for sock in sockets:
                sock.close()
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _stop_signal(self, stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM/SIGINT: stop, and end the process if the stop has not finished by a deadline (the grace
        for tasks, the one for HTTP requests, and 5 s more)."""
        if not stop.is_set():
            stop.set()
            watchdog.arm(SHUTDOWN_GRACE_S + self.config.shutdown_timeout_s + 5.0, loop)

    async def _serve(
        self, stop: asyncio.Event, ready: asyncio.Event | None, system: ActorSystem, sockets: list[socket.socket]
    ) -> None:
        config, parts, port = self.config, self.parts, self.port
        service = ClusterService(
            parts,
            self.source,
            context_length=self.context_length,
            dtype=config.dtype,
            statistics=self.statistics,
            max_active=config.max_concurrent,
            max_queue=config.max_queue,
        )
        app = create_app(service, config.api)
        app[METRICS_KEY].register(NodeCollector(self.statistics))
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
            for sock in sockets:
                await web.SockSite(runner, sock).start()
            say_who_may_join(
                config.host,
                port,
                api_key=config.api.api_key,
                auth=config.cluster_auth,
                secret=config.cluster_secret,
                secret_path=config.cluster_secret_path,
                seed=parts.gossip.addresses()[0],
            )
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(parts.peers.run(stop, parts.router), name="peers"),
                    tg.create_task(parts.coordinator.run(stop), name="coordinator"),
                    tg.create_task(parts.gossip.run(stop), name="gossip"),
                    tg.create_task(self._supervise(system, stop), name="supervise"),
                ]
                await parts.peers.wait_ready(timeout=10.0)
                self._peers_ready.set()
                for host, peer_port in config.peers:
                    if (host, peer_port) != (config.host, port):
                        parts.peers.dial(host, peer_port)
                if config.discovery:
                    tasks.append(tg.create_task(self._discover(port, stop), name="discovery"))
                tasks.append(tg.create_task(self._announce(port, ready, stop), name="announce"))
                tasks.append(tg.create_task(watch_alone(self, stop), name="alone"))
                await stop.wait()
                # Wake the loops that wait for changes so they see the stop now, not at their next deadline.
                parts.gossip.wake()
                parts.coordinator.wake()
                print("exo-stable: shutting down", file=sys.stderr, flush=True)
                await self._stop_within(tasks, SHUTDOWN_GRACE_S)
        finally:
            await runner.cleanup()

    async def _stop_within(self, tasks: list[asyncio.Task[None]], grace_s: float) -> None:
        """Give the node's tasks ``grace_s`` seconds to end after the stop; cancel, and name, any still running
        (a stop must not wait without a deadline: a task that does not end is a bug, logged to be found)."""
        running = [t for t in tasks if not t.done()]
        if not running:
            return
        _, late = await asyncio.wait(running, timeout=grace_s)
        if late:
            names = ", ".join(sorted(t.get_name() for t in late))
            log.warning("%s: still running %.0fs after the stop, cancelled: %s", self.node_id, grace_s, names)
            for task in late:
                task.cancel()

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
        hosts = [h for h, _ in self.parts.gossip.addresses() if addr.is_dialable(h) and is_ip(h)]
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


def link_integrity(peers: PeersStatistics) -> IntegrityCounters:
    """The corrupt frames and retransmits of every link (what adaptive strictness adds to the owner's own)."""
    links = [st for _, _, st in peers.links()]
    return IntegrityCounters(
        corruptions=sum(st.corrupt_frames for st in links), retransmits=sum(st.retransmissions for st in links)
    )


def listen(host: str, port: int) -> list[socket.socket]:
    """Bind and listen on the API's (and the wire's) sockets now, as ``loop.create_server`` would: one per
    address ``host`` resolves to, IPv6 ones IPv6-only; with port 0, every one on the port the first one drew.
    Connections wait in the backlog until the node's site starts serving them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, resolved in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            drawn = port == 0 and len(sockets) > 1
            sock.bind((resolved[0], sockets[0].getsockname()[1], *resolved[2:]) if drawn else resolved)
            sock.listen(128)  # the port is this node's from now on (a second node on it fails here)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
    node = Node(config, source)
    await node.run(ready=ready)
    if node.gave_up is not None:
        raise ModelTooLarge(node.gave_up)


__all__ = ["ClusterService", "Node", "NodeConfig", "StageSupervisor", "available_memory", "serve", "serving_dtype"]
