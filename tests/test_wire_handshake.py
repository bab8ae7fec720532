"""Handshake: identities, versions, the HMAC challenge-response (pure), and what a stranger learns (sockets)."""

from __future__ import annotations

import hashlib
import hmac
import itertools

import aiohttp
import msgspec
import pytest

from exo_stable.wire.frame import FrameCodec
from exo_stable.wire.handshake import (
    SECRET_ENV,
    Acceptor,
    Dialer,
    FailureLimiter,
    HandshakeError,
    Identity,
    new_nonce,
    resolve_secret,
)
from exo_stable.wire.messages import CODEC, PROTOCOL_VERSION, Auth, Hello
from exo_stable.wire.peerlink import LinkConfig, PeerLink, close_ws, send_handshake
from exo_stable.wire.server import WireServer

A = Identity("a", "sa", capabilities=("mlx",), memory_bytes=8 << 30, model_fingerprint="fp")
B = Identity("b", "sb")


def shake(dialer_secret: bytes | None, acceptor_secret: bytes | None, dialer: Identity = A) -> None:
    d = Dialer(dialer, dialer_secret, link_id="la")
    acc = Acceptor(B, acceptor_secret)
    challenge = acc.on_hello(d.hello(tx_base=5))
    info_a = acc.on_auth(d.on_challenge(challenge))
    info_b = d.on_welcome(acc.welcome(tx_base=9, link_id="lb"))
    assert (info_b.node_id, info_b.tx_base, info_b.link_id) == ("b", 9, "lb")
    assert (info_a.node_id, info_a.tx_base, info_a.memory_bytes, info_a.capabilities, info_a.link_id) == (
        "a",
        5,
        8 << 30,
        ("mlx",),
        "la",
    )


def test_handshake_with_and_without_secret() -> None:
    shake(None, None)
    shake(b"s3cret", b"s3cret")


@pytest.mark.parametrize(
    ("dialer_secret", "acceptor_secret", "match"),
    [
        (b"one", b"two", "dialer failed the cluster secret challenge"),
        (None, b"two", "dialer did not prove"),
        (b"one", None, "acceptor did not prove"),
    ],
)
def test_wrong_or_missing_secret_is_refused(
    dialer_secret: bytes | None, acceptor_secret: bytes | None, match: str
) -> None:
    with pytest.raises(HandshakeError, match=match):
        shake(dialer_secret, acceptor_secret)


def test_the_acceptor_reveals_nothing_derived_from_the_secret_before_the_dialers_proof() -> None:
    """The answer to a hello is a nonce and the acceptor's public identity; the same for any secret."""
    hello = Dialer(A, None).hello(tx_base=1)
    one, two = Acceptor(B, b"s3cret").on_hello(hello), Acceptor(B, b"other").on_hello(hello)
    assert msgspec.structs.replace(one, nonce=two.nonce) == two
    acc = Acceptor(B, b"s3cret")
    acc.on_hello(hello)
    with pytest.raises(HandshakeError, match="dialer did not prove"):
        acc.on_auth(Auth(proof=b""))
    with pytest.raises(HandshakeError, match="wrong secret"):
        acc.on_auth(Auth(proof=b"\0" * 32))


def test_a_proof_does_not_replay_on_another_attempt() -> None:
    d = Dialer(A, b"s3cret")
    acc = Acceptor(B, b"s3cret")
    auth = d.on_challenge(acc.on_hello(d.hello(tx_base=1)))
    acc.on_auth(auth)
    again = Acceptor(B, b"s3cret")
    again.on_hello(d._hello)  # type: ignore[arg-type]  # the same hello: a fresh nonce all the same
    with pytest.raises(HandshakeError, match="wrong secret"):
        again.on_auth(auth)


def test_version_mismatch_self_connection_and_bad_nonce() -> None:
    old = Identity("a", "sa", protocol_version=PROTOCOL_VERSION + 1)
    with pytest.raises(HandshakeError, match="protocol version mismatch"):
        shake(None, None, dialer=old)
    with pytest.raises(HandshakeError, match="own id"):
        Acceptor(A, None).on_hello(Dialer(A, None).hello(tx_base=1))
    short = msgspec.structs.replace(Dialer(A, None).hello(tx_base=1), nonce=b"x")
    with pytest.raises(HandshakeError, match="nonce"):
        Acceptor(B, None).on_hello(short)


def test_failure_limiter_refills_and_forgets() -> None:
    now = [0.0]
    limiter = FailureLimiter(burst=3, refill_s=1.0, max_addresses=2, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.allowed("x")
        limiter.failed("x")
    assert not limiter.allowed("x") and limiter.allowed("y")
    now[0] += 1.0
    assert limiter.allowed("x")
    limiter.failed("y")
    limiter.failed("z")
    assert len(limiter) == 2


def test_secret_resolution() -> None:
    assert resolve_secret("cli", {SECRET_ENV: "env"}) == b"cli"
    assert resolve_secret(None, {SECRET_ENV: "env"}) == b"env"
    assert resolve_secret(None, {}) is None


WORDS = [b"password", b"secret", b"s3cret", b"exo", b"cluster", b"letmein"]


async def test_one_reply_to_a_hello_gives_no_offline_guess_and_failures_are_limited() -> None:
    """The issue's attack: say hello with a made-up id, keep the reply, try a dictionary against every
    HMAC-sized field of it over any transcript; then keep guessing online until the server refuses."""
    codec = FrameCodec(max_frame_bytes=1 << 20)
    config = LinkConfig()
    made: list[PeerLink] = []

    def accept(hello: Hello) -> PeerLink:  # as a node's PeerManager does: any peer may get a link
        made.append(PeerLink(B, peer_id=hello.node_id, config=config))
        return made[-1]

    server = WireServer(B, secret=b"s3cret", config=config, on_new_peer=accept)
    async with server, aiohttp.ClientSession() as http:
        async with http.ws_connect(server.url) as ws:
            hello = Hello(node_id="mallory", protocol_version=PROTOCOL_VERSION, session_id="s", nonce=new_nonce())
            await send_handshake(ws, codec, hello)
            reply = CODEC.decode(codec.decode((await ws.receive(timeout=5)).data).payload)
            await close_ws(ws, 1.0)
        fields = msgspec.structs.asdict(reply)
        blobs = [v for v in fields.values() if isinstance(v, bytes) and len(v) == 32]
        nonces = [v for v in fields.values() if isinstance(v, bytes)]
        for word, blob, role, nonce in itertools.product(WORDS, blobs, (b"acceptor", b"dialer"), nonces):
            transcript = msgspec.msgpack.encode(
                (role, "mallory", hello.nonce, "s", fields.get("node_id"), nonce, fields.get("session_id"), 2)
            )
            assert not hmac.compare_digest(hmac.new(word, transcript, hashlib.sha256).digest(), blob), word
        # Online guesses: each costs a round trip, and the address is refused after a burst of failures.
        refused = []
        for _ in range(server.limiter.burst + 2):
            link = PeerLink(Identity("mallory", "s"), url=server.url, secret=b"guess", config=config, session=http)
            try:
                await link._dial_once()
            except HandshakeError as exc:
                refused.append(exc.reason)
            finally:
                await link.close()
        assert "too many failed handshakes" in refused[-1], refused
        assert not server._links and not made, "a refused peer left a link behind"


@pytest.mark.parametrize(
    "change",
    [
        {"node_id": "x" * 10_000},
        {"node_id": "evil\nCRITICAL forged"},
        {"node_id": ""},
        {"capabilities": tuple(f"c{i}" for i in range(100))},
        {"model_fingerprint": "f" * 5000},
    ],
)
def test_a_peer_describes_itself_in_a_few_printable_characters(change: dict[str, object]) -> None:
    hello = msgspec.structs.replace(Dialer(A, None).hello(tx_base=1), **change)
    with pytest.raises(HandshakeError, match=r"printable|capabilities"):
        Acceptor(B, None).on_hello(hello)
