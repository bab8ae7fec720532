"""Link handshake: identity, protocol version, and HMAC challenge-response over the cluster secret. Pure.

::

    dialer                                    acceptor
      Hello(node id, version, caps, memory,
            fingerprint, session, nonce_d)  ─▶  version ok? else Rejected
                                            ◀─  Welcome(…, nonce_a, proof_a = HMAC(secret, "acceptor" ‖ T))
      proof_a ok? else Rejected
      Auth(proof_d = HMAC(secret, "dialer" ‖ T)) ─▶  proof_d ok? else Rejected
                                            ◀─  Accepted

``T`` is the transcript: both node ids, both nonces, both session ids and the version, so a proof cannot be
replayed on another connection. Each side proves the secret only after the other's fresh nonce is known.
Without a configured secret proofs are empty; a side that has a secret refuses a peer without one.
The secret comes from ``--cluster-secret`` or the environment variable ``EXO_STABLE_CLUSTER_SECRET``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Final

import msgspec

from exo_stable.wire.messages import PROTOCOL_VERSION, Accepted, Auth, Hello, Rejected, Welcome

SECRET_ENV: Final = "EXO_STABLE_CLUSTER_SECRET"
NONCE_BYTES: Final = 16


def secret_from_env(environ: dict[str, str] | None = None) -> bytes | None:
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV, "")
    return value.encode() if value else None


def resolve_secret(cli_value: str | bytes | None, environ: dict[str, str] | None = None) -> bytes | None:
    """The command-line value wins over the environment; empty means no secret."""
    if cli_value:
        return cli_value.encode() if isinstance(cli_value, str) else cli_value
    return secret_from_env(environ)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def new_session_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Identity:
    """What a node says about itself in the handshake."""

    node_id: str
    session_id: str
    capabilities: tuple[str, ...] = ()
    memory_bytes: int = 0
    model_fingerprint: str = ""
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the peer said about itself, once the handshake succeeded."""

    node_id: str
    session_id: str
    protocol_version: int
    capabilities: tuple[str, ...]
    memory_bytes: int
    model_fingerprint: str
    tx_base: int


class HandshakeError(Exception):
    """The handshake failed; ``reason`` is logged and sent to the peer in :class:`Rejected`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _proof(secret: bytes | None, role: bytes, hello: Hello, welcome_fields: tuple[str, bytes, str]) -> bytes:
    if secret is None:
        return b""
    a_id, a_nonce, a_session = welcome_fields
    transcript = msgspec.msgpack.encode(
        (role, hello.node_id, hello.nonce, hello.session_id, a_id, a_nonce, a_session, hello.protocol_version)
    )
    return hmac.new(secret, transcript, hashlib.sha256).digest()


def _check_proof(secret: bytes | None, expected: bytes, got: bytes, who: str) -> None:
    if secret is None:
        return
    if not got:
        raise HandshakeError(f"{who} did not prove the cluster secret (none configured there?)")
    if not hmac.compare_digest(expected, got):
        raise HandshakeError(f"{who} failed the cluster secret challenge (wrong secret)")


def _check_version(version: int, local: int) -> None:
    if version != local:
        raise HandshakeError(f"protocol version mismatch: peer speaks {version}, this node speaks {local}")


class Dialer:
    """The connecting side's handshake state."""

    def __init__(self, identity: Identity, secret: bytes | None, *, expected_peer: str | None = None) -> None:
        self.identity = identity
        self._secret = secret
        self._expected_peer = expected_peer
        self._hello: Hello | None = None

    def hello(self, tx_base: int) -> Hello:
        me = self.identity
        self._hello = Hello(
            node_id=me.node_id,
            protocol_version=me.protocol_version,
            session_id=me.session_id,
            nonce=new_nonce(),
            capabilities=me.capabilities,
            memory_bytes=me.memory_bytes,
            model_fingerprint=me.model_fingerprint,
            tx_base=tx_base,
        )
        return self._hello

    def on_welcome(self, welcome: Welcome) -> tuple[Auth, PeerInfo]:
        """Verify the acceptor; raises :class:`HandshakeError`."""
        hello = self._hello
        if hello is None:
            raise RuntimeError("hello() first")
        _check_version(welcome.protocol_version, hello.protocol_version)
        if self._expected_peer is not None and welcome.node_id != self._expected_peer:
            raise HandshakeError(f"expected node {self._expected_peer!r}, reached {welcome.node_id!r}")
        fields = (welcome.node_id, welcome.nonce, welcome.session_id)
        _check_proof(self._secret, _proof(self._secret, b"acceptor", hello, fields), welcome.proof, "acceptor")
        auth = Auth(proof=_proof(self._secret, b"dialer", hello, fields))
        info = PeerInfo(
            node_id=welcome.node_id,
            session_id=welcome.session_id,
            protocol_version=welcome.protocol_version,
            capabilities=welcome.capabilities,
            memory_bytes=welcome.memory_bytes,
            model_fingerprint=welcome.model_fingerprint,
            tx_base=welcome.tx_base,
        )
        return auth, info


class Acceptor:
    """The accepting side's handshake state."""

    def __init__(self, identity: Identity, secret: bytes | None) -> None:
        self.identity = identity
        self._secret = secret
        self._hello: Hello | None = None
        self._fields: tuple[str, bytes, str] | None = None

    def on_hello(self, hello: Hello, tx_base: int) -> Welcome:
        """Answer a Hello; raises :class:`HandshakeError`."""
        me = self.identity
        _check_version(hello.protocol_version, me.protocol_version)
        if hello.node_id == me.node_id:
            raise HandshakeError(f"peer claims this node's own id {me.node_id!r}")
        self._hello = hello
        self._fields = (me.node_id, new_nonce(), me.session_id)
        return Welcome(
            node_id=me.node_id,
            protocol_version=me.protocol_version,
            session_id=me.session_id,
            nonce=self._fields[1],
            proof=_proof(self._secret, b"acceptor", hello, self._fields),
            capabilities=me.capabilities,
            memory_bytes=me.memory_bytes,
            model_fingerprint=me.model_fingerprint,
            tx_base=tx_base,
        )

    def on_auth(self, auth: Auth) -> tuple[Accepted, PeerInfo]:
        hello, fields = self._hello, self._fields
        if hello is None or fields is None:
            raise RuntimeError("on_hello() first")
        _check_proof(self._secret, _proof(self._secret, b"dialer", hello, fields), auth.proof, "dialer")
        info = PeerInfo(
            node_id=hello.node_id,
            session_id=hello.session_id,
            protocol_version=hello.protocol_version,
            capabilities=hello.capabilities,
            memory_bytes=hello.memory_bytes,
            model_fingerprint=hello.model_fingerprint,
            tx_base=hello.tx_base,
        )
        return Accepted(), info


def rejected(reason: str) -> Rejected:
    return Rejected(reason=reason)
