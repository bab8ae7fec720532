"""ReliableMessageTransport: a node's links behind one send/receive API (the design's component).

It owns the node's :class:`WireServer` and one :class:`PeerLink` per peer, shares one
:class:`NetworkHealthMonitor` among them, and adds end-to-end checks on what it hands out: token chunks
are checked by :class:`TokenTransferValidator`, tensors and activation chunks by their own checksums.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from exo_stable.wire.handshake import Identity
from exo_stable.wire.health import NetworkHealthMonitor, PeerHealth
from exo_stable.wire.messages import (
    ActivationChunk,
    Message,
    RecoveryAction,
    TensorPayload,
    TokenChunk,
    ValidationError,
    ValidationResult,
    tensor_checksum,
)
from exo_stable.wire.peerlink import LinkConfig, LinkStats, PeerLink
from exo_stable.wire.server import WireServer
from exo_stable.wire.validation import TokenTransferValidator


@dataclass(frozen=True, slots=True)
class TransferResult:
    destination: str
    seq: int
    acknowledged: bool
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class ValidatedMessage:
    source: str
    message: Message
    validation: ValidationResult


_VALID = ValidationResult(is_valid=True)


class ReliableMessageTransport:
    def __init__(
        self,
        identity: Identity,
        *,
        secret: bytes | None = None,
        config: LinkConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor: NetworkHealthMonitor | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or LinkConfig()
        self.monitor = monitor or NetworkHealthMonitor()
        self._secret = secret
        self.server = WireServer(identity, secret=secret, config=self.config, host=host, port=port)
        self._links: dict[str, PeerLink] = {}
        self.validator = TokenTransferValidator()

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        try:
            for link in list(self._links.values()):
                await link.close()
        finally:
            await self.server.close()

    async def __aenter__(self) -> ReliableMessageTransport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _new_link(self, peer_id: str, url: str | None) -> PeerLink:
        if peer_id in self._links:
            raise ValueError(f"already linked to {peer_id!r}")
        link = PeerLink(
            self.identity,
            url=url,
            peer_id=peer_id,
            secret=self._secret,
            config=self.config,
            monitor=self.monitor,
        )
        self._links[peer_id] = link
        return link

    def accept_from(self, peer_id: str) -> PeerLink:
        """A link that waits for ``peer_id`` to dial this node."""
        link = self._new_link(peer_id, None)
        self.server.register(link)
        return link

    async def connect(self, peer_id: str, url: str) -> PeerLink:
        """A link that dials ``peer_id`` at ``url`` (and redials after drops)."""
        link = self._new_link(peer_id, url)
        await link.start()
        return link

    def link(self, peer_id: str) -> PeerLink:
        try:
            return self._links[peer_id]
        except KeyError:
            raise KeyError(f"no link to {peer_id!r}") from None

    async def send(self, message: Message, destination: str, *, timeout: float) -> int:  # noqa: ASYNC109
        return await self.link(destination).send(message, timeout=timeout)

    async def send_with_validation(
        self,
        message: Message,
        destination: str,
        *,
        timeout: float,  # noqa: ASYNC109 (deadline is mandatory)
    ) -> TransferResult:
        """Send and wait until the peer acknowledged receipt (its frame checksum held) within ``timeout``."""
        start = time.monotonic()
        link = self.link(destination)
        if isinstance(message, TokenChunk) and not message.checksum:
            message = self.validator.seal(message)
        seq = await link.send(message, timeout=timeout)
        await link.wait_acked(max(0.0, timeout - (time.monotonic() - start)), seq=seq)
        return TransferResult(destination, seq, True, time.monotonic() - start)

    async def receive_with_validation(self, source: str, *, timeout: float) -> ValidatedMessage:  # noqa: ASYNC109
        message = await self.link(source).recv(timeout=timeout)
        return ValidatedMessage(source, message, self.validate(message))

    def validate(self, message: Message) -> ValidationResult:
        """End-to-end check of a received message's own checksum, where it carries one."""
        match message:
            case TokenChunk():
                return self.validator.validate_token(message)
            case TensorPayload():
                ok = message.verify()
            case ActivationChunk():
                ok = tensor_checksum(message.data) == message.checksum
            case _:
                return _VALID
        if ok:
            return _VALID
        return ValidationResult(
            is_valid=False,
            error_type=ValidationError.CHECKSUM_MISMATCH,
            suggested_action=RecoveryAction.RETRANSMIT,
            detail=f"{type(message).__name__} fails its checksum",
        )

    def statistics(self) -> dict[str, LinkStats]:
        return {peer: link.statistics() for peer, link in self._links.items()}

    def health(self) -> dict[str, PeerHealth]:
        return self.monitor.snapshot_all()
