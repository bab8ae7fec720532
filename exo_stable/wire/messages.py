"""Every peer message as a msgspec ``Struct`` in one tagged union, msgpack on the wire.

Rules for this module (schema evolution):

- Each message subclasses :class:`WireMessage` with a short, stable ``tag``; the tag is the wire name.
- Structs are encoded as msgpack maps (field names on the wire), so a new field can be added to an
  existing message as long as it has a default: old peers ignore it, new peers fill the default.
- Never rename or reuse a tag or a field; add a new one instead. Breaking changes bump
  :data:`PROTOCOL_VERSION`, which the handshake checks.
- To add a message: define the Struct here and add it to :data:`Message`. A test checks that every
  ``WireMessage`` subclass is in the union.

There is one :class:`Codec` (one encoder, one decoder, built once) for the whole process.
"""

from __future__ import annotations

import enum
import math
import zlib
from datetime import UTC, datetime
from typing import Final

import msgspec

PROTOCOL_VERSION: Final = 2
"""2: the dialer proves the cluster secret first (Hello, Challenge, Auth, Welcome; see handshake.py)."""
"""Wire protocol version; the handshake refuses a peer with a different one."""


class WireMessage(msgspec.Struct, frozen=True, kw_only=True, tag_field="t"):
    """Base of every peer message. ``t`` on the wire holds the subclass's tag."""


# ---------------------------------------------------------------------------------------------------------
# Enumerations (encoded by value; add members at the end, never renumber)
# ---------------------------------------------------------------------------------------------------------


class ValidationStatus(enum.StrEnum):
    UNCHECKED = "unchecked"
    VALID = "valid"
    INVALID = "invalid"


class ValidationError(enum.StrEnum):
    CHECKSUM_MISMATCH = "checksum_mismatch"
    OUT_OF_ORDER = "out_of_order"
    DUPLICATE = "duplicate"
    GAP = "gap"
    BAD_ENCODING = "bad_encoding"
    BAD_FIELD = "bad_field"


class RecoveryAction(enum.StrEnum):
    NONE = "none"
    RETRANSMIT = "retransmit"
    REGENERATE = "regenerate"
    RESTART_PIPELINE = "restart_pipeline"
    REINITIALIZE_DEVICE = "reinitialize_device"
    FALLBACK_SINGLE_DEVICE = "fallback_single_device"


class CorruptionType(enum.StrEnum):
    CHECKSUM = "checksum"
    ENCODING = "encoding"
    SEQUENCE = "sequence"
    TENSOR = "tensor"
    FRAME = "frame"


class CorruptionSeverity(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class BarrierStatus(enum.StrEnum):
    PENDING = "pending"
    RELEASED = "released"
    TIMED_OUT = "timed_out"
    FAILED = "failed"


# ---------------------------------------------------------------------------------------------------------
# Handshake (see handshake.py for the protocol)
# ---------------------------------------------------------------------------------------------------------


class Hello(WireMessage, frozen=True, tag="hello"):
    """First message from the dialing side."""

    node_id: str
    protocol_version: int
    session_id: str
    """Random per PeerLink incarnation: a new one tells the peer to reset its receive state."""
    nonce: bytes
    capabilities: tuple[str, ...] = ()
    memory_bytes: int = 0
    model_fingerprint: str = ""
    tx_base: int = 1
    """Lowest sequence number this side may still (re)send: a fresh receiver starts there."""
    link_id: str = ""
    """Random per PeerLink object: a new one (same session) also tells the peer to reset its receive state."""


class Challenge(WireMessage, frozen=True, tag="challenge"):
    """The accepting side's answer to :class:`Hello`: its fresh nonce, and nothing derived from the secret."""

    node_id: str
    protocol_version: int
    session_id: str
    nonce: bytes


class Welcome(WireMessage, frozen=True, tag="welcome"):
    """The accepting side admits the link after the dialer's :class:`Auth`, with its own proof of the secret."""

    node_id: str
    protocol_version: int
    session_id: str
    nonce: bytes
    proof: bytes = b""
    capabilities: tuple[str, ...] = ()
    memory_bytes: int = 0
    model_fingerprint: str = ""
    tx_base: int = 1
    link_id: str = ""


class Auth(WireMessage, frozen=True, tag="auth"):
    """The dialing side's proof of the cluster secret."""

    proof: bytes = b""


class Accepted(WireMessage, frozen=True, tag="accepted"):
    """Protocol 1's last handshake message (kept so that its tag is never reused)."""


class Rejected(WireMessage, frozen=True, tag="rejected"):
    """Either side refuses the link; ``reason`` is logged on both ends."""

    reason: str


# ---------------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------------


class StepHop(msgspec.Struct, frozen=True):
    """One stage's account of one forward step, for the request's trace (embedded in chunks and tokens).

    Each stage appends its hop to what it forwards; the last stage's token brings them all to the owner.
    """

    node_id: str
    stage: int
    start: int
    end: int
    step: int
    position: int
    tokens: int
    stage_s: float  # from taking the step in to sending its result on
    bytes_out: int = 0
    checksum: str = ""
    received_at: float = 0.0  # wall clock (time.time()) when the stage took the step in
    compute_s: float = 0.0  # of stage_s, the forward call on the stage's compute thread
    batch: int = 1  # requests whose steps shared this forward call (continuous batching; 1: computed alone)


class TokenChunk(WireMessage, frozen=True, tag="token"):
    """One sampled token on its way to the request owner (the design's EnhancedTokenChunk).

    ``checksum`` covers the token's identity (see ``validation.token_bytes``); it travels end to end, beyond
    the per-frame checksum of the link.
    """

    request_id: str
    sequence_position: int
    token_id: int
    source_device_rank: int
    checksum: str = ""
    generation_timestamp: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))
    validation_status: ValidationStatus = ValidationStatus.UNCHECKED
    plan_epoch: int = 0
    finish_reason: str | None = None
    hops: tuple[StepHop, ...] = ()
    """The forward steps behind this token (and any earlier steps that yielded no token), for tracing."""
    hops_lost: int = 0
    """Hops the last stage could not keep for this token (its bound was reached)."""
    logprob: float | None = None
    """The token's log-probability, when the request asked for them (``SamplingSpec.logprobs``)."""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """The most likely tokens at this position and their log-probabilities, best first."""


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------

DTYPE_SIZES: Final[dict[str, int]] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int16": 2,
    "float16": 2,
    "bfloat16": 2,
    "uint32": 4,
    "int32": 4,
    "float32": 4,
    "uint64": 8,
    "int64": 8,
    "float64": 8,
    "complex64": 8,
}


def tensor_checksum(data: bytes | memoryview) -> int:
    """CRC32 of a tensor's bytes (every burst of up to 32 flipped bits is caught)."""
    return zlib.crc32(data)


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return DTYPE_SIZES[dtype] * math.prod(shape)


class TensorPayload(WireMessage, frozen=True, tag="tensor"):
    """A whole tensor as raw bytes with dtype, shape and its own checksum."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes
    checksum: int
    name: str = ""

    @classmethod
    def from_bytes(cls, dtype: str, shape: tuple[int, ...], data: bytes, name: str = "") -> TensorPayload:
        want = expected_nbytes(dtype, shape)
        if len(data) != want:
            raise ValueError(f"{dtype}{list(shape)} needs {want} bytes, got {len(data)}")
        return cls(dtype=dtype, shape=tuple(shape), data=data, checksum=tensor_checksum(data), name=name)

    def verify(self) -> bool:
        """True when size matches dtype/shape and the checksum matches the bytes."""
        try:
            want = expected_nbytes(self.dtype, self.shape)
        except ValueError:
            return False
        return len(self.data) == want and tensor_checksum(self.data) == self.checksum


class ActivationChunk(WireMessage, frozen=True, tag="act"):
    """One piece of a (possibly large) activation tensor for one request step.

    A tensor larger than the chunk size travels as ``chunk_count`` chunks; ``tensor_checksum`` covers the
    whole tensor and ``checksum`` this chunk. See ``tensors.chunk_activation`` and ``ActivationAssembler``.
    """

    request_id: str
    step: int
    chunk_index: int
    chunk_count: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    total_nbytes: int
    data: bytes
    checksum: int
    tensor_checksum: int
    plan_epoch: int = 0
    tensor_name: str = ""
    position: int = 0
    final: bool = True
    source_checksum: int = -1
    """CRC32 of the whole tensor taken by the sending stage on its compute thread (strict validation; -1:
    not taken). Independent of ``checksum``/``tensor_checksum``, which are computed later, when it is framed."""
    hops: tuple[StepHop, ...] = ()
    """The forward steps of this step so far, one per stage before the receiver (for tracing)."""


# ---------------------------------------------------------------------------------------------------------
# The pipeline: plans, barriers, requests and their steps
# ---------------------------------------------------------------------------------------------------------


class StageRange(msgspec.Struct, frozen=True):
    """Layers ``[start, end)`` held by ``node_id`` (embedded in plan messages)."""

    node_id: str
    start: int
    end: int


class SamplingSpec(msgspec.Struct, frozen=True):
    """A request's sampling parameters; the last stage samples with them (greedy when temperature is 0)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_tail: tuple[int, ...] = ()
    """The prompt's last tokens, which the penalties count as seen (only when a penalty is on)."""
    logprobs: int | None = None
    """Send each token's log-probability and this many of the most likely ones (None: none)."""
    grammar: str = ""
    """A grammar the completion must follow (llguidance's JSON form), or empty."""


class PeerAddress(msgspec.Struct, frozen=True):
    node_id: str
    host: str
    port: int


class PeerDirectory(WireMessage, frozen=True, tag="peers"):
    """The nodes a node knows, so that every member can link to every other one (a full mesh)."""

    peers: tuple[PeerAddress, ...]


class PlanProposal(WireMessage, frozen=True, tag="plan"):
    """The leader asks every member to load its layer range for plan ``epoch``."""

    epoch: int
    leader: str
    model_fingerprint: str
    n_layers: int
    stages: tuple[StageRange, ...]


class StageStatus(WireMessage, frozen=True, tag="stage_status"):
    """A member's answer to a proposal: its range is loaded (or why not)."""

    epoch: int
    node_id: str
    ready: bool
    detail: str = ""
    load_s: float = 0.0
    agreed_epoch: int = 0  # on a refusal: the highest epoch the member agreed to (the leader proposes past it)


class PlanCommit(WireMessage, frozen=True, tag="plan_commit"):
    """Every stage of plan ``epoch`` is loaded: new requests use it."""

    epoch: int
    leader: str
    model_fingerprint: str
    n_layers: int
    stages: tuple[StageRange, ...]


class BarrierArrive(WireMessage, frozen=True, tag="barrier"):
    """``member`` reached the named barrier (``ok`` false: it cannot, and says why)."""

    name: str
    member: str
    ok: bool = True
    detail: str = ""
    attempt: int = 0


class RequestOpen(WireMessage, frozen=True, tag="req_open"):
    """The owner announces a request to every stage of its plan; each answers with BarrierArrive."""

    request_id: str
    owner: str
    plan_epoch: int
    sampling: SamplingSpec
    max_tokens: int
    prompt_tokens: int
    barrier: str = ""
    history: tuple[int, ...] = ()
    """Tokens already generated (a replay after a failure): the last stage feeds these instead of sampling."""
    validation: str = "light"
    """The request's validation level (``off``, ``light``, ``strict``; see ``pipeline/levels.py``)."""
    spot_check_fraction: float = 0.0
    """Strict only: the share of steps each stage recomputes and compares bit for bit."""
    spot_check_seed: int = 0
    """Seeds the choice of the steps to recompute."""
    first_position: int = 0
    """A fast replay: the prompt chunks already hold the tokens before this position (one batched
    re-prefill); the first token the last stage sends is the one at ``first_position``."""


class StepInput(WireMessage, frozen=True, tag="step"):
    """Token ids into stage 0: a chunk of the prompt, or the token generated at ``position - 1``.

    ``final`` marks the forward call whose logits yield the token at ``position``.
    """

    request_id: str
    plan_epoch: int
    step: int
    position: int
    tokens: tuple[int, ...]
    final: bool = True


class RequestClose(WireMessage, frozen=True, tag="req_close"):
    """The owner is done with a request (finished, cancelled, failed): free its caches."""

    request_id: str
    reason: str = "finished"


class ResendTokens(WireMessage, frozen=True, tag="resend"):
    """The owner asks the last stage for tokens it is missing or that failed validation."""

    request_id: str
    positions: tuple[int, ...]


class StageFailure(WireMessage, frozen=True, tag="stage_failure"):
    """A stage could not run a request's step; the owner ends or recovers the request."""

    request_id: str
    node_id: str
    detail: str
    step: int = -1
    plan_epoch: int = -1
    """The plan the failed request ran on (-1: any; an owner ignores failures of a plan it already left)."""


# ---------------------------------------------------------------------------------------------------------
# Small generic messages (useful for tests and tools)
# ---------------------------------------------------------------------------------------------------------


class SuspectNode(WireMessage, frozen=True, tag="suspect"):
    """``node_id`` keeps failing (its stage supervisor gave up, or owners saw it fail again and again):
    plans leave it out for ``ttl_s`` seconds."""

    node_id: str
    reporter: str
    reason: str
    ttl_s: float = 60.0


Message = (
    Hello
    | Challenge
    | Welcome
    | Auth
    | Accepted
    | Rejected
    | TokenChunk
    | TensorPayload
    | ActivationChunk
    | PeerDirectory
    | PlanProposal
    | StageStatus
    | PlanCommit
    | BarrierArrive
    | RequestOpen
    | StepInput
    | RequestClose
    | ResendTokens
    | StageFailure
    | SuspectNode
)
"""Every message a peer may send. Add new message types here."""


# ---------------------------------------------------------------------------------------------------------
# The design's data models: what validators, the corruption detector and barriers return. Not peer messages
# (no node sends them, so they are not in :data:`Message`); they live here beside the enumerations they use.
# ---------------------------------------------------------------------------------------------------------


class ValidationResult(msgspec.Struct, frozen=True, kw_only=True):
    """The verdict of a validator on one token or delta (the design's data model; never sent)."""

    is_valid: bool
    error_type: ValidationError | None = None
    confidence_score: float = 1.0
    suggested_action: RecoveryAction = RecoveryAction.NONE
    detail: str = ""


class CorruptionReport(msgspec.Struct, frozen=True, kw_only=True):
    """One stretch of corruption found in output (the design's data model; never sent)."""

    corruption_type: CorruptionType
    affected_range: tuple[int, int]
    severity: CorruptionSeverity
    recovery_possible: bool
    source_node: str = ""
    detail: str = ""


class SyncState(msgspec.Struct, frozen=True, kw_only=True):
    """A barrier's state (the design's data model; never sent)."""

    participating_devices: tuple[str, ...]
    sync_timestamp: datetime
    barrier_status: BarrierStatus
    timeout_remaining: float
    barrier_name: str = ""


class Codec:
    """msgpack encoder/decoder for :data:`Message`; build once, reuse."""

    __slots__ = ("_decoder", "_encoder")

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)

    def encode(self, message: Message) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes | memoryview) -> Message:
        """Decode one message; raises ``msgspec.DecodeError``/``ValidationError`` on bad input."""
        return self._decoder.decode(data)


CODEC: Final = Codec()
