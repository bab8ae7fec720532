"""Bounded, seeded hypothesis fuzzing of the peer protocol against a real in-process node with a secret.

- Handshakes: random bytes, handshake frames holding random messages, hellos with random fields followed
  by random proofs. None gets in, none leaves a link or a peer entry, the node keeps answering.
- Messages: a peer that holds the secret sends random well-formed messages of every type in the union
  (ids and epochs biased towards the node's real ones). The node never crashes, refuses what the sender's
  role does not allow, still answers clients exactly as before, and once the peer leaves it holds nothing
  of it.
"""

from __future__ import annotations

import asyncio
import enum
import http.client
import json
import time
import types
import typing
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from fuzz_node import FUZZ_EXAMPLES, BackgroundNode, background_node
from hostile_peer import identity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_stable.engine.synthetic import tiny_gguf
from exo_stable.wire.frame import FrameCodec, FrameKind
from exo_stable.wire.messages import CODEC, PROTOCOL_VERSION, Hello, Message, PeerAddress
from exo_stable.wire.peerlink import WIRE_PATH, PeerLink

SECRET = b"fuzzing-secret-0123456789abcdef"
ME = "zz-fuzz"
COUNTS = {"handshakes": 0, "message_cases": 0, "messages": 0}


@pytest.fixture(scope="module")
def target(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundNode]:
    model = tiny_gguf(tmp_path_factory.mktemp("fuzzpeer") / "tiny.gguf", default_gguf, layers=2, seed=12)
    with background_node(model, secret=SECRET, peer_forget_s=1.0) as node:
        node.node.peers.server.limiter.burst = 10**9  # the fuzz, not the rate limit (tested elsewhere), is the point
        yield node


def ids(node: BackgroundNode) -> st.SearchStrategy[str]:
    n = node.node
    real = [n.node_id, ME, "", f"{n.node_id}-0-00000000", "open/x", "plan/1"]
    return st.sampled_from(real) | st.text(max_size=16)


def epochs(node: BackgroundNode) -> st.SearchStrategy[int]:
    plan = node.node.coordinator.active
    epoch = 0 if plan is None else plan.epoch
    return st.sampled_from([epoch, epoch + 1, 0, -1]) | st.integers(-(2**63), 2**64 - 1) | st.integers(-2, 4096)


def strategy_for(tp: Any, node: BackgroundNode, name: str = "") -> st.SearchStrategy[Any]:
    """Any value of type ``tp`` (as msgspec encodes it), biased towards the node's real ids and epochs."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is PeerAddress:  # peers the node knows already: the fuzz must not make it dial out
        known = st.sampled_from([node.node.node_id, ME])
        return st.builds(PeerAddress, known, st.just("127.0.0.1"), st.integers(1, 65535))
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(a, node, name) for a in args))
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0], node, name), max_size=4).map(tuple)
        return st.tuples(*(strategy_for(a, node, name) for a in args))
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return epochs(node) if "epoch" in name else st.integers(-(2**63), 2**64 - 1) | st.integers(-2, 64)
    if tp is float:
        return st.floats()
    if tp is str:
        return ids(node)
    if tp is bytes:
        return st.binary(max_size=64)
    if tp is datetime:
        return st.datetimes(timezones=st.just(UTC))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        fields = {f.name: strategy_for(f.type, node, f.name) for f in msgspec.structs.fields(tp)}
        return st.builds(tp, **fields)
    raise TypeError(f"no strategy for {tp!r}")


def messages(node: BackgroundNode) -> st.SearchStrategy[Message]:
    return st.one_of(*(strategy_for(cls, node) for cls in typing.get_args(Message)))


def complete(node: BackgroundNode) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", node.node.port, timeout=60)
    try:
        body = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0})
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == 200, payload
        text: str = payload["choices"][0]["text"]
        return text
    finally:
        conn.close()


SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES or 150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(data=st.data())
def test_no_handshake_gets_in_or_leaves_anything(target: BackgroundNode, data: st.DataObject) -> None:
    codec = FrameCodec(max_frame_bytes=1 << 20)
    hello = data.draw(strategy_for(Hello, target))
    if data.draw(st.booleans()):
        hello = msgspec.structs.replace(hello, protocol_version=PROTOCOL_VERSION, nonce=bytes(16))
    frames = data.draw(
        st.lists(
            st.one_of(
                st.binary(max_size=128),
                st.just(codec.encode(FrameKind.HANDSHAKE, CODEC.encode(hello))),
                messages(target).map(lambda m: codec.encode(FrameKind.HANDSHAKE, CODEC.encode(m))),
                messages(target).map(lambda m: codec.encode(FrameKind.DATA, CODEC.encode(m), seq=1)),
            ),
            min_size=1,
            max_size=4,
        )
    )

    async def shake() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{target.root}{WIRE_PATH}") as ws:
            for frame in frames:
                if ws.closed:
                    break
                await ws.send_bytes(frame)
            async with asyncio.timeout(10):
                while not ws.closed:
                    msg = await ws.receive()
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                    if msg.type is aiohttp.WSMsgType.BINARY and len(frames) == 1:
                        await ws.close()  # the challenge to a lone hello: the dialer gives up

    target.call(shake())
    COUNTS["handshakes"] += 1
    peers = target.node.peers
    assert not peers._peers and not peers.server._links, "a refused handshake left state behind"


@pytest.fixture(scope="module")
def fuzz_peer(target: BackgroundNode) -> Iterator[tuple[PeerLink, str]]:
    before = complete(target)
    link = PeerLink(
        identity(ME, target.node.source.fingerprint, memory_bytes=0),
        url=f"ws://127.0.0.1:{target.node.port}{WIRE_PATH}",
        secret=SECRET,
    )

    async def start() -> None:
        await link.start()
        await link.wait_connected(timeout=15)

    target.call(start())
    try:
        yield link, before
    finally:
        target.call(link.close())


@settings(SETTINGS, max_examples=FUZZ_EXAMPLES or 300)
@given(data=st.data())
def test_messages_from_a_member_never_crash_or_change_answers(
    target: BackgroundNode, fuzz_peer: tuple[PeerLink, str], data: st.DataObject
) -> None:
    link, _ = fuzz_peer
    batch = data.draw(st.lists(messages(target), min_size=1, max_size=6))

    async def send() -> None:
        for message in batch:
            await link.send(message, timeout=10)
        await link.wait_acked(timeout=30)
        while link.recv_nowait() is not None:  # what the node answers: read and dropped
            pass

    target.call(send())
    COUNTS["message_cases"] += 1
    COUNTS["messages"] += len(batch)
    assert link.connected, "the node dropped the member's link"


def test_after_the_message_fuzz_the_node_answers_and_forgets_the_peer(
    target: BackgroundNode, fuzz_peer: tuple[PeerLink, str]
) -> None:
    link, before = fuzz_peer
    node = target.node
    assert complete(target) == before
    assert node.coordinator.active is not None and {s.node_id for s in node.coordinator.active.stages} == {node.node_id}
    target.call(link.close())
    deadline = time.monotonic() + 30
    while (node.peers._peers or node.stage_host.requests_of(ME)) and time.monotonic() < deadline:
        time.sleep(0.1)  # the node's own loop forgets the peer: polled from this thread
    assert not node.peers._peers and node.stage_host.requests_of(ME) == 0
    assert complete(target) == before
    print(
        f"peer fuzz: {COUNTS['handshakes']} handshake cases, {COUNTS['message_cases']} message cases "
        f"({COUNTS['messages']} messages), {node.refusals.total} refused by role"
    )
