"""Link handshake: identity, protocol version, and HMAC challenge-response over the cluster secret. Pure.

::

    dialer                                    acceptor
      Hello(node id, version, session, nonce_d,
            caps, memory, fingerprint, link)  ─▶  version ok, not rate-limited? else Rejected
                                            ◀─  Challenge(node id, version, session, nonce_a)
      Auth(proof_d = HMAC(secret, "dialer" ‖ T)) ─▶  proof_d ok? else Rejected (a failure counts)
                                            ◀─  Welcome(…, proof_a = HMAC(secret, "acceptor" ‖ T))
      proof_a ok? else Rejected

``T`` is the transcript: both node ids, both nonces, both session ids and the version, so a proof cannot be
replayed on another connection (each side's nonce is fresh per attempt). The dialer proves the secret
first: an acceptor reveals nothing derived from the secret to a peer that has not proved it, so one
reply to a hello gives nothing to guess the secret from offline, and online guesses are rate-limited per
remote address (:class:`FailureLimiter`). Without a configured secret proofs are empty; a side that has a
secret refuses a peer without one. The secret comes from ``--cluster-secret`` or the environment variable
``EXO_STABLE_CLUSTER_SECRET``; it should be long and random (a dialer that reaches an impostor still hands
it a proof to guess against, so only a secret too long to guess keeps that safe).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec

from exo_stable import settings
from exo_stable.wire.messages import PROTOCOL_VERSION, Auth, Challenge, Hello, Rejected, Welcome

SECRET_ENV: Final = settings.CLUSTER_SECRET.name
NONCE_BYTES: Final = 16


def secret_from_env(environ: dict[str, str] | None = None) -> bytes | None:
    value = settings.CLUSTER_SECRET.get(environ)
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
    link_id: str = ""


class HandshakeError(Exception):
    """The handshake failed; ``reason`` is logged and sent to the peer in :class:`Rejected`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _transcript(role: bytes, hello: Hello, challenge: Challenge) -> bytes:
    return msgspec.msgpack.encode(
        (
            role,
            hello.node_id,
            hello.nonce,
            hello.session_id,
            challenge.node_id,
            challenge.nonce,
            challenge.session_id,
            hello.protocol_version,
        )
    )


def _proof(secret: bytes | None, role: bytes, hello: Hello, challenge: Challenge) -> bytes:
    if secret is None:
        return b""
    return hmac.new(secret, _transcript(role, hello, challenge), hashlib.sha256).digest()


def _check_proof(secret: bytes | None, expected: bytes, got: bytes, who: str) -> None:
    if secret is None:
        return
    if not got:
        raise HandshakeError(f"{who} did not prove the cluster secret (none configured there?)")
    if not hmac.compare_digest(expected, got):
        raise HandshakeError(f"{who} failed the cluster secret challenge (wrong secret)")


MAX_ID_CHARS: Final = 128
MAX_CAPABILITIES: Final = 16


def _check_identity(
    node_id: str, session_id: str, capabilities: tuple[str, ...] = (), fingerprint: str = "", link_id: str = ""
) -> None:
    """A peer's self-description stays small and printable: it is kept, logged and shown."""
    if not 0 < len(node_id) <= MAX_ID_CHARS or not node_id.isprintable():
        raise HandshakeError(f"a node id must be 1 to {MAX_ID_CHARS} printable characters")
    for what, value in (("session id", session_id), ("model fingerprint", fingerprint), ("link id", link_id)):
        if len(value) > MAX_ID_CHARS or not value.isprintable():
            raise HandshakeError(f"a {what} must be at most {MAX_ID_CHARS} printable characters")
    if len(capabilities) > MAX_CAPABILITIES or any(len(c) > 256 or not c.isprintable() for c in capabilities):
        raise HandshakeError(f"at most {MAX_CAPABILITIES} capabilities of at most 256 printable characters")


def _check_version(version: int, local: int) -> None:
    if version != local:
        raise HandshakeError(f"protocol version mismatch: peer speaks {version}, this node speaks {local}")


class Dialer:
    """The connecting side's handshake state."""

    def __init__(
        self, identity: Identity, secret: bytes | None, *, expected_peer: str | None = None, link_id: str = ""
    ) -> None:
        self.identity = identity
        self._secret = secret
        self._expected_peer = expected_peer
        self._link_id = link_id
        self._hello: Hello | None = None
        self._challenge: Challenge | None = None

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
            link_id=self._link_id,
        )
        return self._hello

    def on_challenge(self, challenge: Challenge) -> Auth:
        """Prove the secret over this attempt's transcript; raises :class:`HandshakeError`."""
        hello = self._hello
        if hello is None:
            raise RuntimeError("hello() first")
        _check_version(challenge.protocol_version, hello.protocol_version)
        _check_identity(challenge.node_id, challenge.session_id)
        if self._expected_peer is not None and challenge.node_id != self._expected_peer:
            raise HandshakeError(f"expected node {self._expected_peer!r}, reached {challenge.node_id!r}")
        if len(challenge.nonce) != NONCE_BYTES:
            raise HandshakeError(f"the acceptor's nonce has {len(challenge.nonce)} bytes, not {NONCE_BYTES}")
        self._challenge = challenge
        return Auth(proof=_proof(self._secret, b"dialer", hello, challenge))

    def on_welcome(self, welcome: Welcome) -> PeerInfo:
        """Verify the acceptor's proof; raises :class:`HandshakeError`."""
        hello, challenge = self._hello, self._challenge
        if hello is None or challenge is None:
            raise RuntimeError("on_challenge() first")
        if (welcome.node_id, welcome.session_id, welcome.nonce) != (
            challenge.node_id,
            challenge.session_id,
            challenge.nonce,
        ):
            raise HandshakeError("the acceptor's welcome does not match its challenge")
        expected = _proof(self._secret, b"acceptor", hello, challenge)
        _check_proof(self._secret, expected, welcome.proof, "acceptor")
        _check_identity(welcome.node_id, welcome.session_id, welcome.capabilities, welcome.model_fingerprint)
        return PeerInfo(
            node_id=welcome.node_id,
            session_id=welcome.session_id,
            protocol_version=welcome.protocol_version,
            capabilities=welcome.capabilities,
            memory_bytes=welcome.memory_bytes,
            model_fingerprint=welcome.model_fingerprint,
            tx_base=welcome.tx_base,
            link_id=welcome.link_id,
        )


class Acceptor:
    """The accepting side's handshake state."""

    def __init__(self, identity: Identity, secret: bytes | None) -> None:
        self.identity = identity
        self._secret = secret
        self._hello: Hello | None = None
        self._challenge: Challenge | None = None

    def on_hello(self, hello: Hello) -> Challenge:
        """Answer a Hello with a fresh nonce (nothing derived from the secret); raises :class:`HandshakeError`."""
        me = self.identity
        _check_version(hello.protocol_version, me.protocol_version)
        _check_identity(hello.node_id, hello.session_id, hello.capabilities, hello.model_fingerprint, hello.link_id)
        if hello.node_id == me.node_id:
            raise HandshakeError(f"peer claims this node's own id {me.node_id!r}")
        if len(hello.nonce) != NONCE_BYTES:
            raise HandshakeError(f"the dialer's nonce has {len(hello.nonce)} bytes, not {NONCE_BYTES}")
        self._hello = hello
        self._challenge = Challenge(
            node_id=me.node_id, protocol_version=me.protocol_version, session_id=me.session_id, nonce=new_nonce()
        )
        return self._challenge

    def on_auth(self, auth: Auth) -> PeerInfo:
        """Verify the dialer's proof; raises :class:`HandshakeError`. Then :meth:`welcome` answers it."""
        hello, challenge = self._hello, self._challenge
        if hello is None or challenge is None:
            raise RuntimeError("on_hello() first")
        _check_proof(self._secret, _proof(self._secret, b"dialer", hello, challenge), auth.proof, "dialer")
        return PeerInfo(
            node_id=hello.node_id,
            session_id=hello.session_id,
            protocol_version=hello.protocol_version,
            capabilities=hello.capabilities,
            memory_bytes=hello.memory_bytes,
            model_fingerprint=hello.model_fingerprint,
            tx_base=hello.tx_base,
            link_id=hello.link_id,
        )

    def welcome(self, tx_base: int, link_id: str = "") -> Welcome:
        """The acceptor's proof and identity, only for a dialer whose proof :meth:`on_auth` verified."""
        hello, challenge = self._hello, self._challenge
        if hello is None or challenge is None:
            raise RuntimeError("on_auth() first")
        me = self.identity
        return Welcome(
            node_id=me.node_id,
            protocol_version=me.protocol_version,
            session_id=me.session_id,
            nonce=challenge.nonce,
            proof=_proof(self._secret, b"acceptor", hello, challenge),
            capabilities=me.capabilities,
            memory_bytes=me.memory_bytes,
            model_fingerprint=me.model_fingerprint,
            tx_base=tx_base,
            link_id=link_id,
        )


class FailureLimiter:
    """Failed handshakes per remote address, as a token bucket: ``burst`` failures at once, then one per
    ``refill_s``; an address out of tokens is refused before any work. Remembers ``max_addresses`` (LRU)."""

    def __init__(
        self,
        *,
        burst: int = 10,
        refill_s: float = 1.0,
        max_addresses: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.refill_s = refill_s
        self.max_addresses = max_addresses
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address: (tokens, at)
        self.limited = 0

    def _tokens(self, address: str) -> float:
        tokens, at = self._buckets.get(address, (float(self.burst), self._clock()))
        return min(float(self.burst), tokens + (self._clock() - at) / self.refill_s)

    def allowed(self, address: str) -> bool:
        ok = self._tokens(address) >= 1.0
        if not ok:
            self.limited += 1
        return ok

    def failed(self, address: str) -> None:
        self._buckets[address] = (max(0.0, self._tokens(address) - 1.0), self._clock())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def rejected(reason: str) -> Rejected:
    return Rejected(reason=reason)
