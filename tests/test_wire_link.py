"""Two real PeerLinks over real sockets on 127.0.0.1, under injected faults, and refusals."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from exo_stable.wire.faults import FaultConfig
from exo_stable.wire.frame import FrameCodec, FrameKind, FrameTooLarge
from exo_stable.wire.handshake import Dialer, Identity, new_session_id
from exo_stable.wire.health import PeerState
from exo_stable.wire.messages import (
    CODEC,
    PROTOCOL_VERSION,
    Challenge,
    ResendTokens,
    TensorPayload,
    Welcome,
)
from exo_stable.wire.peerlink import LinkClosed, LinkConfig, PeerLink, recv_handshake, send_handshake
from exo_stable.wire.server import WireServer

N = 10_000
BASE = LinkConfig(heartbeat_interval_s=0.25, heartbeat_timeout_s=5.0, handshake_timeout_s=5.0)


def note(n: int, text: str = "") -> ResendTokens:
    """A small real message that carries a number and some text (an owner's request for token ``n``)."""
    return ResendTokens(request_id=text, positions=(n,))


def ident(name: str, **kw: object) -> Identity:
    return Identity(name, new_session_id(), **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def pair(
    config: LinkConfig = BASE,
    *,
    server_secret: bytes | None = None,
    client_secret: bytes | None = None,
    client_identity: Identity | None = None,
) -> AsyncIterator[tuple[PeerLink, PeerLink, WireServer]]:
    """``a`` dials ``b``'s server; yields (a, b, server)."""
    b_id = ident("b")
    a_id = client_identity or ident("a")
    async with WireServer(b_id, secret=server_secret, config=config) as server:
        b = PeerLink(b_id, peer_id=a_id.node_id, secret=server_secret, config=config)
        server.register(b)
        async with b, PeerLink(a_id, url=server.url, peer_id="b", secret=client_secret, config=config) as a:
            yield a, b, server


async def exchange(a: PeerLink, b: PeerLink, n: int, back: int) -> tuple[list[ResendTokens], list[ResendTokens]]:
    """a sends n notes to b while b sends ``back`` notes to a; both sides collect what they get."""
    got_b: list[ResendTokens] = []
    got_a: list[ResendTokens] = []

    async def produce(link: PeerLink, count: int, tag: str) -> None:
        for i in range(count):
            await link.send(note(i, f"{tag}{i}" * (1 + i % 7)), timeout=30)

    async def consume(link: PeerLink, count: int, into: list[ResendTokens]) -> None:
        for _ in range(count):
            msg = await link.recv(timeout=30)
            assert isinstance(msg, ResendTokens)
            into.append(msg)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce(a, n, "a"))
        tg.create_task(produce(b, back, "b"))
        tg.create_task(consume(b, n, got_b))
        tg.create_task(consume(a, back, got_a))
    await a.wait_acked(timeout=30)
    await b.wait_acked(timeout=30)
    return got_b, got_a


SCENARIOS = {
    "none": None,
    "drop": FaultConfig(drop=0.02, seed=1),
    "dup": FaultConfig(dup=0.02, seed=2),
    "reorder": FaultConfig(reorder=4, seed=3),
    "corrupt": FaultConfig(corrupt=0.01, seed=4),
    "delay": FaultConfig(delay=0.01, delay_ms=2, seed=5),
    "cut": FaultConfig(cut_every=2000, seed=6),
    "all": FaultConfig(drop=0.02, dup=0.02, reorder=4, corrupt=0.01, delay=0.002, cut_every=2000, seed=7),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_exactly_once_in_order_unaltered_under_faults(name: str) -> None:
    faults = SCENARIOS[name]
    config = LinkConfig(**{**_fields(BASE), "faults": faults})
    back = N // 5
    start = time.perf_counter()
    async with pair(config) as (a, b, _):
        got_b, got_a = await exchange(a, b, N, back)
        elapsed = time.perf_counter() - start
        assert [m.positions[0] for m in got_b] == list(range(N))
        assert all(m.request_id == f"a{m.positions[0]}" * (1 + m.positions[0] % 7) for m in got_b)
        assert [m.positions[0] for m in got_a] == list(range(back))
        assert all(m.request_id == f"b{m.positions[0]}" * (1 + m.positions[0] % 7) for m in got_a)
        sa, sb = a.statistics(), b.statistics()
        injected = {"a": a.fault_counts, "b": b.fault_counts}
        print(
            f"\n[{name}] {N}+{back} messages in {elapsed:.2f}s; "
            f"a: retransmits={sa.retransmissions} (fast {sa.fast_retransmissions}, timer "
            f"{sa.timeout_retransmissions}) dups_suppressed={sa.duplicates_suppressed} "
            f"corrupt_detected={sa.corrupt_frames} connects={sa.connects} injected={injected['a']}; "
            f"b: retransmits={sb.retransmissions} dups_suppressed={sb.duplicates_suppressed} "
            f"corrupt_detected={sb.corrupt_frames} connects={sb.connects} injected={injected['b']}"
        )
        for link, stats in ((a, sa), (b, sb)):
            counts = link.fault_counts
            assert stats.undecodable == 0 and stats.out_of_window == 0
            if counts is None:  # no faults: nothing corrupt (a retransmit may still fire on a busy box)
                assert stats.corrupt_frames == 0 and not stats.bad_frames_by_reason
                continue
            assert stats.corrupt_frames == counts.corrupted, stats.bad_frames_by_reason
            assert set(stats.bad_frames_by_reason) <= {"checksum_mismatch", "checksum_required"}
        if faults is None:
            return
        fb = b.fault_counts
        assert fb is not None
        if faults.drop:
            assert fb.dropped > 0 and sa.retransmissions > 0
        if faults.dup:
            assert fb.duplicated > 0 and sb.duplicates_suppressed > 0
        if faults.reorder:
            assert fb.reordered > 0 and sb.reordered > 0
        if faults.corrupt:
            assert fb.corrupted > 0
        if faults.delay:
            assert fb.delayed > 0
        if faults.cut_every:
            assert fb.cuts >= 1 and sb.connects >= fb.cuts + 1


def _fields(config: LinkConfig) -> dict[str, object]:
    return {f: getattr(config, f) for f in config.__slots__}


async def test_wrong_cluster_secret_is_refused_and_the_node_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="exo_stable.wire")
    async with pair(server_secret=b"right", client_secret=b"wrong") as (a, b, server):
        reason = await server.wait_rejection(timeout=10)
        assert "cluster secret" in reason
        assert not a.connected and not b.connected
        assert "refused a connection" in caplog.text and "cluster secret" in caplog.text
        # The same server still admits a peer that knows the secret.
        c_id = ident("c")
        c_side = PeerLink(server.identity, peer_id="c", secret=b"right", config=BASE)
        server.register(c_side)
        async with c_side, PeerLink(c_id, url=server.url, secret=b"right", config=BASE) as c:
            await c.wait_connected(timeout=10)
            await c.send(note(1), timeout=5)
            assert await c_side.recv(timeout=5) == note(1)


async def test_missing_secret_is_refused() -> None:
    async with pair(server_secret=b"right", client_secret=None) as (_, _, server):
        assert "did not prove the cluster secret" in await server.wait_rejection(timeout=10)


async def test_right_secret_connects_and_measures_rtt() -> None:
    async with pair(server_secret=b"s", client_secret=b"s") as (a, b, _):
        info = await a.wait_connected(timeout=10)
        assert info.node_id == "b" and info.protocol_version == PROTOCOL_VERSION
        for i in range(50):
            await a.send(note(i), timeout=5)
        for i in range(50):
            assert await b.recv(timeout=5) == note(i)
        await a.wait_acked(timeout=5)
        assert a.statistics().rtt_s is not None
        rtt = await a.ping(timeout=5)
        assert 0 < rtt < 1
        snap = a.monitor.snapshot("b")
        assert snap.rtt_samples >= 1
        assert snap.state is PeerState.ALIVE and snap.rtt_p50_s is not None and snap.rtt_p50_s < 1


async def test_wrong_protocol_version_is_refused() -> None:
    old = ident("a", protocol_version=PROTOCOL_VERSION + 1)
    async with pair(client_identity=old) as (a, _, server):
        assert "protocol version mismatch" in await server.wait_rejection(timeout=10)
        assert not a.connected


async def test_unknown_peer_is_refused() -> None:
    async with pair() as (_, _, server), PeerLink(ident("stranger"), url=server.url, config=BASE):
        assert "unknown peer" in await server.wait_rejection(timeout=10)


async def test_garbage_and_oversized_handshake_frames_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="exo_stable.wire")
    config = LinkConfig(**{**_fields(BASE), "max_frame_bytes": 1 << 16})
    async with pair(config) as (a, b, server), aiohttp.ClientSession() as session:
        async with session.ws_connect(server.url) as ws:
            await ws.send_bytes(b"\x00garbage")
            reply = await ws.receive(timeout=5)
            assert reply.type is aiohttp.WSMsgType.BINARY  # a Rejected frame
        assert "bad handshake frame" in await server.wait_rejection(timeout=5)
        async with session.ws_connect(server.url) as ws:
            await ws.send_str("hello?")
        assert "expected a binary handshake frame" in await server.wait_rejection(timeout=5)
        async with session.ws_connect(server.url) as ws:
            await ws.send_bytes(b"x" * ((1 << 16) + 1))
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        reason = await server.wait_rejection(timeout=5)
        assert "websocket error" in reason and "exceeds limit" in reason
        # The node is fine: the real link still works.
        await a.send(note(7), timeout=5)
        assert await b.recv(timeout=5) == note(7)
    assert "refused a connection" in caplog.text


async def test_garbage_and_oversized_frames_on_an_established_link() -> None:
    """A raw peer completes the handshake, then sends garbage: dropped and counted, link carries on."""
    config = LinkConfig(**{**_fields(BASE), "max_frame_bytes": 1 << 16})
    codec = FrameCodec(max_frame_bytes=1 << 16)
    raw_id = ident("raw")
    async with WireServer(ident("b"), config=config) as server, aiohttp.ClientSession() as session:
        b = PeerLink(server.identity, peer_id="raw", config=config)
        server.register(b)
        async with b:
            for _ in range(2):  # second round: reconnect after the oversized frame killed the first
                async with session.ws_connect(server.url, max_msg_size=1 << 20) as ws:
                    dialer = Dialer(raw_id, None)
                    await send_handshake(ws, codec, dialer.hello(tx_base=1))
                    auth = dialer.on_challenge(await recv_handshake(ws, codec, Challenge))
                    await send_handshake(ws, codec, auth)
                    dialer.on_welcome(await recv_handshake(ws, codec, Welcome))
                    seq = b.statistics().messages_delivered + 1
                    await ws.send_bytes(b"garbage that is long enough to look like a frame header..")
                    await ws.send_str("text is not allowed")
                    good = codec.encode(FrameKind.DATA, CODEC.encode(note(seq)), seq=seq)
                    await ws.send_bytes(good)
                    assert await b.recv(timeout=5) == note(seq)
                    await ws.send_bytes(b"y" * ((1 << 16) + 10))  # oversized: the connection is dropped
                    await b.wait_disconnected(timeout=5)
            stats = b.statistics()
            assert stats.bad_frames_by_reason["checksum_mismatch"] == 2
            assert stats.bad_frames_by_reason["text_frame"] == 2
            assert stats.bad_frames_by_reason["ws_error"] == 2
            assert stats.messages_delivered == 2 and stats.connects == 2


async def test_sender_refuses_a_message_that_cannot_fit_a_frame() -> None:
    config = LinkConfig(**{**_fields(BASE), "max_frame_bytes": 1 << 16})
    async with pair(config) as (a, _, _):
        with pytest.raises(FrameTooLarge, match="chunk it"):
            await a.send(TensorPayload.from_bytes("uint8", (1 << 16,), bytes(1 << 16)), timeout=1)


async def test_back_pressure_then_everything_arrives() -> None:
    config = LinkConfig(**{**_fields(BASE), "window": 8, "inbox_size": 4})
    async with pair(config) as (a, b, _):
        sent = 0
        with pytest.raises(TimeoutError):
            while True:  # nobody reads b: its inbox fills, then a's window, then send() blocks
                await a.send(note(sent), timeout=0.3)
                sent += 1
        assert 8 <= sent <= 8 + 4 + 2
        for i in range(sent):
            assert await b.recv(timeout=5) == note(i)
        await a.wait_acked(timeout=5)


async def test_heartbeat_timeout_detects_a_silent_peer_and_the_link_recovers() -> None:
    config = LinkConfig(**{**_fields(BASE), "heartbeat_interval_s": 0.05, "heartbeat_timeout_s": 0.4})
    silent = LinkConfig(**{**_fields(config), "faults": FaultConfig(drop=1.0)})
    b_id, a_id = ident("b"), ident("a")
    async with WireServer(b_id, config=config) as server:
        b = PeerLink(b_id, peer_id="a", config=silent)  # b hears nothing after the handshake
        server.register(b)
        async with b, PeerLink(a_id, url=server.url, peer_id="b", config=config) as a:
            await b.wait_connected(timeout=5)
            await b.wait_disconnected(timeout=5)
            assert "heartbeat timeout" in b.statistics().last_error
            assert b.monitor.state("a") in (PeerState.UNKNOWN, PeerState.ALIVE, PeerState.SLOW)
            await b.wait_connected(timeout=5)  # a redials
            assert a.statistics().connects >= 1


async def test_closed_link_refuses_sends_and_wakes_waiters() -> None:
    async with pair() as (a, b, _):
        await a.wait_connected(timeout=5)
        await b.close()
        await a.close()
        with pytest.raises(LinkClosed):
            await a.send(note(1), timeout=1)


def test_a_node_whose_own_loop_stalled_gives_a_silent_peer_one_more_interval() -> None:
    from exo_stable.wire.connection import Connection, peer_silent

    conn = Connection(ws=None, peer=None, last_rx=0.0, next_ping=0.0)  # type: ignore[arg-type]
    timeout, interval = 1.5, 0.375
    assert not peer_silent(conn, 0.3, timeout, interval)  # heard 0.3 s ago
    # This node's loop stalled 3 s: the peer was fine when it stopped looking, so it gets one more interval.
    assert not peer_silent(conn, 3.3, timeout, interval) and conn.stall_graces == 1
    assert not peer_silent(conn, 3.3 + interval / 2, timeout, interval)
    # Nothing heard during the grace: gone, even if this node stalled again.
    assert peer_silent(conn, 3.3 + 2 * interval + 2.0, timeout, interval)
    # A peer silent for a whole timeout before this node stalled gets no grace.
    late = Connection(ws=None, peer=None, last_rx=0.0, next_ping=0.0)  # type: ignore[arg-type]
    assert not peer_silent(late, 1.0, timeout, interval)
    assert not peer_silent(late, 1.0 + interval, timeout, interval)
    assert peer_silent(late, 1.6, timeout, interval)  # turns on time: 1.6 s of silence is too long
    stale = Connection(ws=None, peer=None, last_rx=0.0, next_ping=0.0)  # type: ignore[arg-type]
    assert not peer_silent(stale, 1.4, timeout, interval)
    stale.last_turn = 1.6
    assert peer_silent(stale, 5.0, timeout, interval)  # silent 1.6 s before the stall: no grace
