"""PeerLinkActor: a thin actor around a :class:`PeerLink`, for the node's supervision tree.

The actor owns the link: ``on_start`` starts it, ``on_stop`` closes it. Commands (local only, never on the
wire) go through ``ask``; delivered messages are forwarded, in order, to ``deliver_to`` as
:class:`Delivered` (the forwarding task is owned by the actor: if it fails, the actor crashes and its
supervisor decides), or stay in the link's inbox to be taken with :class:`Recv` when no target is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors import Actor, ActorRef
from exo_stable.wire.messages import Message
from exo_stable.wire.peerlink import PeerLink


@dataclass(frozen=True, slots=True)
class Send:
    """Queue ``message`` on the link (ask: returns its link sequence number)."""

    message: Message
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Flush:
    """Wait until everything sent is acknowledged."""

    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Recv:
    """Take the next delivered message (only without ``deliver_to``)."""

    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class GetStats:
    """Ask: the link's :class:`~exo_stable.wire.peerlink.LinkStats`."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """What a PeerLinkActor tells ``deliver_to`` for each message from its peer, in order."""

    peer: str
    message: Message


LinkCommand = Send | Flush | Recv | GetStats


class PeerLinkActor(Actor[LinkCommand]):
    def __init__(
        self, link: PeerLink, *, deliver_to: ActorRef[Delivered] | None = None, deliver_timeout: float = 5.0
    ) -> None:
        self.link = link
        self._deliver_to = deliver_to
        self._deliver_timeout = deliver_timeout

    def default_name(self) -> str:
        return f"peerlink-{self.link.peer_id or 'unknown'}"

    async def on_start(self) -> None:
        await self.link.start()
        if self._deliver_to is not None:
            self.start_task(self._forward(self._deliver_to), name=f"{self.default_name()} forward")

    async def on_stop(self) -> None:
        await self.link.close()

    async def _forward(self, target: ActorRef[Delivered]) -> None:
        idle = self.link.config.heartbeat_timeout_s
        while True:
            try:
                message = await self.link.recv(timeout=idle)
            except TimeoutError:
                continue  # nothing arrived within the window; keep waiting (cancelled on stop)
            await target.tell(Delivered(self.link.peer_id or "", message), timeout=self._deliver_timeout)

    async def receive(self, message: LinkCommand) -> Any:
        match message:
            case Send(msg, timeout):
                return await self.link.send(msg, timeout=timeout)
            case Flush(timeout):
                await self.link.wait_acked(timeout=timeout)
                return None
            case Recv(timeout):
                if self._deliver_to is not None:
                    raise RuntimeError("messages are forwarded to deliver_to; Recv is not available")
                return await self.link.recv(timeout=timeout)
            case GetStats():
                return self.link.statistics()
