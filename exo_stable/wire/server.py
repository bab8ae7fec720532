"""WireServer: the accepting side. Runs the handshake for each incoming websocket and hands it to its link.

A refused connection (wrong cluster secret, wrong protocol version, unknown peer, garbage or oversized
frame, timeout) is logged with its reason, counted, answered with :class:`Rejected` where the socket still
works, and closed; the node carries on. Nothing is created for a peer before it proved the cluster secret
(no link, no peer entry), and an address with too many failed handshakes is refused for a while.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable

from aiohttp import web

from exo_stable.logs import safe
from exo_stable.wire.frame import FrameCodec
from exo_stable.wire.handshake import Acceptor, FailureLimiter, HandshakeError, Identity
from exo_stable.wire.messages import Auth, Hello, Rejected
from exo_stable.wire.peerlink import WIRE_PATH, LinkConfig, PeerLink, close_ws, recv_handshake, send_handshake

log = logging.getLogger("exo_stable.wire")

LinkFactory = Callable[[Hello], PeerLink | None]


class WireServer:
    """Accepts peer connections on ``host:port`` (port 0: an ephemeral port, see :attr:`port`)."""

    def __init__(
        self,
        identity: Identity,
        *,
        secret: bytes | None = None,
        config: LinkConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        on_new_peer: LinkFactory | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or LinkConfig()
        self.host = host
        self.port = port
        self._secret = secret
        self._codec = FrameCodec(max_frame_bytes=self.config.max_frame_bytes, checksum=self.config.checksum)
        self._links: dict[str, PeerLink] = {}
        self._on_new_peer = on_new_peer
        self._runner: web.AppRunner | None = None
        self.rejections: Counter[str] = Counter()
        self.limiter = FailureLimiter()
        self._recent_rejections: deque[str] = deque(maxlen=64)
        self._rejected_event = asyncio.Event()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{WIRE_PATH}"

    def register(self, link: PeerLink) -> None:
        if link.peer_id is None:
            raise ValueError("an accepting link needs its peer_id")
        self._links[link.peer_id] = link

    def unregister(self, peer_id: str) -> None:
        self._links.pop(peer_id, None)

    def link(self, peer_id: str) -> PeerLink | None:
        return self._links.get(peer_id)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The websocket handler, for a node that serves the wire route on its own application."""
        return await self._handle(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(WIRE_PATH, self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=self.config.close_timeout_s
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = self._runner.addresses
        if self.port == 0 and sockets:
            self.port = int(sockets[0][1])
        log.info("wire server for %s listening on %s", self.identity.node_id, self.url)

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> WireServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_rejection(self, timeout: float) -> str:  # noqa: ASYNC109 (deadline is mandatory)
        """The reason of the next refused connection (or of one already refused and not yet taken)."""
        async with asyncio.timeout(timeout):
            while not self._recent_rejections:
                self._rejected_event.clear()
                await self._rejected_event.wait()
        return self._recent_rejections.popleft()

    def _reject(self, peer: str, reason: str) -> None:
        label = reason.split(":", 1)[0].split("(", 1)[0].strip()
        if label.startswith("unknown peer"):
            label = "unknown peer"  # the label set stays small whatever ids strangers send
        self.rejections[label] += 1
        self._recent_rejections.append(reason)
        self._rejected_event.set()
        log.warning("wire server %s refused a connection from %s: %s", self.identity.node_id, peer, safe(reason))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        ws = web.WebSocketResponse(
            max_msg_size=cfg.max_frame_bytes,
            heartbeat=None,
            compress=False,
            autoping=True,
            timeout=cfg.close_timeout_s,
        )
        await ws.prepare(request)
        address = request.remote or "?"
        remote = address
        try:
            try:
                if not self.limiter.allowed(address):
                    raise HandshakeError("too many failed handshakes from this address; try again later")
                async with asyncio.timeout(cfg.handshake_timeout_s):
                    hello = await recv_handshake(ws, self._codec, Hello)
                    remote = f"{safe(hello.node_id)}@{address}"
                    acceptor = Acceptor(self.identity, self._secret)
                    await send_handshake(ws, self._codec, acceptor.on_hello(hello))
                    info = acceptor.on_auth(await recv_handshake(ws, self._codec, Auth))
                    # Only now, the dialer having proved the secret, does the peer get a link (and state).
                    link = self._links.get(hello.node_id)
                    if link is None and self._on_new_peer is not None:  # a closed one: this node is stopping
                        link = self._on_new_peer(hello)
                        if link is not None:
                            self.register(link)
                    if link is None or link.closed:
                        raise HandshakeError(f"unknown peer {safe(hello.node_id)}")
                    await send_handshake(ws, self._codec, acceptor.welcome(tx_base=link.tx_base, link_id=link.link_id))
            except TimeoutError as exc:
                raise HandshakeError("handshake timed out") from exc
        except HandshakeError as exc:
            if "too many failed handshakes" not in exc.reason:
                self.limiter.failed(address)
            self._reject(remote, exc.reason)
            if not ws.closed:
                try:
                    await send_handshake(ws, self._codec, Rejected(reason=exc.reason))
                except ConnectionError as send_exc:
                    log.debug("could not send the rejection to %s: %r", remote, send_exc)
            await close_ws(ws, cfg.close_timeout_s, code=1008, message=exc.reason[:100].encode())
            return ws
        try:
            await link.serve(ws, info)
        finally:
            await close_ws(ws, cfg.close_timeout_s)
        return ws
