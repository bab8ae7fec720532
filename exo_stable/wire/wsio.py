"""Websocket IO shared by the link and the wire server: one handshake frame out (:func:`send_handshake`), one
in, checked to hold the expected message (:func:`recv_handshake`; anything else is a
:class:`~exo_stable.wire.handshake.HandshakeError`), and closing a socket with a deadline (:func:`close_ws`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

import aiohttp
import msgspec

from exo_stable.wire.frame import (
    FrameCodec,
    FrameError,
    FrameKind,
)
from exo_stable.wire.handshake import HandshakeError
from exo_stable.wire.linkconfig import WebSocket
from exo_stable.wire.messages import CODEC, Message, Rejected

log = logging.getLogger("exo_stable.wire")

_M = TypeVar("_M")


async def send_handshake(ws: WebSocket, codec: FrameCodec, message: Message) -> None:
    await ws.send_bytes(codec.encode(FrameKind.HANDSHAKE, CODEC.encode(message)))


async def recv_handshake(ws: WebSocket, codec: FrameCodec, expected: type[_M]) -> _M:
    """Read one handshake frame holding an ``expected`` message; anything else raises HandshakeError."""
    msg = await ws.receive()
    if msg.type is aiohttp.WSMsgType.ERROR:
        raise HandshakeError(f"websocket error (oversized or malformed frame?): {msg.data}")
    if msg.type is not aiohttp.WSMsgType.BINARY:
        raise HandshakeError(f"expected a binary handshake frame, got {msg.type.name}")
    try:
        frame = codec.decode(msg.data)
    except FrameError as exc:
        raise HandshakeError(f"bad handshake frame ({exc.reason}): {exc}") from exc
    if frame.kind is not FrameKind.HANDSHAKE:
        raise HandshakeError(f"expected a handshake frame, got {frame.kind.name}")
    try:
        message = CODEC.decode(frame.payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise HandshakeError(f"undecodable handshake message: {exc}") from exc
    if isinstance(message, Rejected):
        raise HandshakeError(f"peer refused: {message.reason}")
    if not isinstance(message, expected):
        raise HandshakeError(f"expected {expected.__name__}, got {type(message).__name__}")
    return message


async def close_ws(ws: WebSocket, timeout: float, *, code: int = 1000, message: bytes = b"") -> None:  # noqa: ASYNC109 (deadline is mandatory)
    if ws.closed:
        return
    try:
        async with asyncio.timeout(timeout):
            await ws.close(code=code, message=message)
    except TimeoutError:
        log.warning("websocket close timed out after %.1fs", timeout)
