"""Handshake logic: identities, versions, the HMAC challenge-response (pure)."""

from __future__ import annotations

import pytest

from exo_stable.wire.handshake import (
    SECRET_ENV,
    Acceptor,
    Dialer,
    HandshakeError,
    Identity,
    resolve_secret,
)
from exo_stable.wire.messages import PROTOCOL_VERSION

A = Identity("a", "sa", capabilities=("mlx",), memory_bytes=8 << 30, model_fingerprint="fp")
B = Identity("b", "sb")


def shake(dialer_secret: bytes | None, acceptor_secret: bytes | None, dialer: Identity = A) -> None:
    d = Dialer(dialer, dialer_secret)
    acc = Acceptor(B, acceptor_secret)
    welcome = acc.on_hello(d.hello(tx_base=5), tx_base=9)
    auth, info_b = d.on_welcome(welcome)
    _, info_a = acc.on_auth(auth)
    assert info_b.node_id == "b" and info_b.tx_base == 9
    assert (info_a.node_id, info_a.tx_base, info_a.memory_bytes, info_a.capabilities) == (
        "a",
        5,
        8 << 30,
        ("mlx",),
    )


def test_handshake_with_and_without_secret() -> None:
    shake(None, None)
    shake(b"s3cret", b"s3cret")


@pytest.mark.parametrize(
    ("dialer_secret", "acceptor_secret", "match"),
    [
        (b"one", b"two", "acceptor failed the cluster secret challenge"),
        (None, b"two", "dialer did not prove"),
        (b"one", None, "acceptor did not prove"),
    ],
)
def test_wrong_or_missing_secret_is_refused(
    dialer_secret: bytes | None, acceptor_secret: bytes | None, match: str
) -> None:
    with pytest.raises(HandshakeError, match=match):
        shake(dialer_secret, acceptor_secret)


def test_acceptor_refuses_a_dialer_with_the_wrong_secret_even_if_it_skips_checks() -> None:
    d = Dialer(A, b"wrong")
    acc = Acceptor(B, b"right")
    welcome = acc.on_hello(d.hello(tx_base=1), tx_base=1)
    forged_dialer = Dialer(A, None)  # replays the Hello but cannot compute the proof
    forged_dialer._hello = d._hello
    with pytest.raises(HandshakeError):
        d.on_welcome(welcome)
    auth, _ = forged_dialer.on_welcome(welcome)
    with pytest.raises(HandshakeError, match="dialer did not prove"):
        acc.on_auth(auth)


def test_version_mismatch_and_self_connection() -> None:
    old = Identity("a", "sa", protocol_version=PROTOCOL_VERSION + 1)
    with pytest.raises(HandshakeError, match="protocol version mismatch"):
        shake(None, None, dialer=old)
    with pytest.raises(HandshakeError, match="own id"):
        Acceptor(A, None).on_hello(Dialer(A, None).hello(tx_base=1), tx_base=1)


def test_secret_resolution() -> None:
    assert resolve_secret("cli", {SECRET_ENV: "env"}) == b"cli"
    assert resolve_secret(None, {SECRET_ENV: "env"}) == b"env"
    assert resolve_secret(None, {}) is None
