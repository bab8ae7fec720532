"""Validation levels ``off | light | strict``, the spot-check choice, delta checks and adaptive strictness. Pure.

What each level does (the README's "Validation levels" section says the same for users):

- ``off`` skips every optional check. What stays, because correctness of the transport and of the stream
  depends on it: each link frame's CRC32, sequence numbers, acknowledgements and retransmits (a corrupted
  frame is never used, at any level); token positions, used to reorder and deduplicate (invariant I2); the
  request id, plan epoch and vocabulary range of each token (needed to route and decode it at all); and the
  detokenizer's UTF-8 safety (a multi-byte character is never split across deltas).
- ``light`` (the default) adds end-to-end checks that cost next to nothing: each token's checksum, sealed by
  the last stage and verified by the request owner (a mismatch asks for the token again); each activation
  chunk's and tensor's CRC32 verified by the receiving stage; every text delta must be valid UTF-8 (a lone
  surrogate cannot be encoded and is caught).
- ``strict`` adds: an activation checksum computed by the sending stage on its compute thread, right where
  the tensor leaves the layers, and verified by the receiving stage (it catches corruption inside the
  sender's memory between compute and framing, which every frame and chunk CRC, computed later, misses);
  :class:`EncodingValidator` on every delta (U+FFFD, control characters); and spot-check recomputation: a
  seeded fraction of steps is run twice on the stage (its KV cache rewound in between) and the two outputs
  compared bit for bit; a mismatch fails the step, which the owner recovers by replaying the request, so the
  token is regenerated.

:class:`AdaptiveStrictness` raises the level new requests run at when corruption or retransmits are
observed, and lowers it again after a clean window.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from exo_stable.pipeline.corruption import CorruptionDetector, Finding
from exo_stable.pipeline.validators import EncodingValidator
from exo_stable.wire.messages import RecoveryAction, ValidationError, ValidationResult

__all__ = [
    "DEFAULT_SPOT_CHECK_FRACTION",
    "AdaptiveConfig",
    "AdaptiveStrictness",
    "DeltaChecker",
    "DeltaFinding",
    "IntegrityCounters",
    "ValidationLevel",
    "parse_level",
    "spot_check_chosen",
]

DEFAULT_SPOT_CHECK_FRACTION: Final = 0.05
"""Share of steps a strict request recomputes, unless configured otherwise."""


class ValidationLevel(enum.StrEnum):
    OFF = "off"
    LIGHT = "light"
    STRICT = "strict"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, other: ValidationLevel) -> bool:
        return self.rank >= other.rank

    def raised(self) -> ValidationLevel:
        """One level up (strict stays strict)."""
        return _ORDER[min(self.rank + 1, len(_ORDER) - 1)]

    def lowered(self) -> ValidationLevel:
        """One level down (off stays off)."""
        return _ORDER[max(self.rank - 1, 0)]


_ORDER: Final = (ValidationLevel.OFF, ValidationLevel.LIGHT, ValidationLevel.STRICT)
_RANK: Final = {level: i for i, level in enumerate(_ORDER)}


def parse_level(text: str) -> ValidationLevel:
    """``off``, ``light`` or ``strict`` (case-insensitive); anything else raises ``ValueError``."""
    try:
        return ValidationLevel(text.strip().lower())
    except ValueError:
        raise ValueError(f"validation level must be off, light or strict, not {text!r}") from None


def level_max(a: ValidationLevel, b: ValidationLevel) -> ValidationLevel:
    return a if a.rank >= b.rank else b


_STEP_KEY: Final = struct.Struct("<qqq")


def spot_check_chosen(fraction: float, seed: int, request_id: str, step: int, stage: int) -> bool:
    """Whether stage ``stage`` recomputes ``step`` of ``request_id``: a seeded, reproducible choice.

    Each (seed, request, step, stage) maps to a uniform number in [0, 1) through blake2b; the step is checked
    when that number is below ``fraction``. The same inputs always give the same answer, on every node.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(
        request_id.encode() + _STEP_KEY.pack(seed & 0x7FFF_FFFF_FFFF_FFFF, step, stage), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------------------
# Text deltas at the owner
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeltaFinding:
    """A delta that failed a check: ``fatal`` (not valid UTF-8: it must not be sent) or only suspicious."""

    fatal: bool
    result: ValidationResult


@dataclass
class DeltaChecker:
    """Checks each text delta at the level of its request; counts what it finds.

    ``light``: the delta must encode as strict UTF-8 (a lone surrogate, the trace of a broken decode or of
    memory corruption in the owner, cannot). ``strict``: also :meth:`EncodingValidator.validate_delta`
    (U+FFFD, stray control characters). ``off``: nothing. A delta that fails the UTF-8 check must not be sent
    (the caller ends the request with an error); a strict-only finding may be the model's own output (it
    can emit invalid bytes or control characters), so it is counted and reported, not refused.
    """

    level: ValidationLevel
    checked: int = 0
    invalid_utf8: int = 0
    suspicious: int = 0
    _encoding: EncodingValidator = field(default_factory=EncodingValidator)

    def check(self, text: str) -> DeltaFinding | None:
        """None when the delta passes (or is not checked at this level), else what is wrong with it."""
        if self.level is ValidationLevel.OFF or not text:
            return None
        self.checked += 1
        try:
            text.encode("utf-8", errors="strict")
        except UnicodeEncodeError as exc:
            self.invalid_utf8 += 1
            result = ValidationResult(
                is_valid=False,
                error_type=ValidationError.BAD_ENCODING,
                suggested_action=RecoveryAction.REGENERATE,
                detail=f"delta is not valid UTF-8 at character {exc.start}: {exc.reason}",
            )
            return DeltaFinding(fatal=True, result=result)
        if self.level is ValidationLevel.STRICT:
            result = self._encoding.validate_delta(text)
            if not result.is_valid:
                self.suspicious += 1
                return DeltaFinding(fatal=False, result=result)
        return None


OUTPUT_WINDOW: Final = 512
"""Characters of assembled text the CorruptionDetector reads each time (its cost grows with its input:
0.13 ms at 128 characters, 0.70 ms at 512, 13.7 ms at 8,192; benchmarks/results/corruption.json)."""
LIGHT_OUTPUT_EVERY: Final = 16
"""At ``light`` the detector reads the window after every 16th delta; at ``strict`` after each one."""


@dataclass
class OutputWatch:
    """The design's CorruptionDetector on the text the client receives: mojibake, repetition loops, stray
    bytes. It reads the last :data:`OUTPUT_WINDOW` characters of the assembled answer (so its cost per delta
    is bounded, not growing with the answer), after every delta at ``strict`` and every
    :data:`LIGHT_OUTPUT_EVERY`\\ th at ``light``. A model can legitimately repeat itself or write odd
    characters, so findings are reported (counted, logged, in the request's trace), never acted on; each
    kind is reported once per request."""

    level: ValidationLevel
    analysed: int = 0
    _tail: str = ""
    _since: int = 0
    _seen: set[str] = field(default_factory=set)
    _detector: CorruptionDetector = field(default_factory=CorruptionDetector)

    def feed(self, text: str) -> tuple[Finding, ...]:
        """New kinds of corruption in the window once ``text`` is appended (empty when not due or clean)."""
        if self.level is ValidationLevel.OFF or not text:
            return ()
        self._tail = (self._tail + text)[-OUTPUT_WINDOW:]
        self._since += 1
        if self._since < (1 if self.level is ValidationLevel.STRICT else LIGHT_OUTPUT_EVERY):
            return ()
        self._since = 0
        self.analysed += 1
        new: list[Finding] = []
        for finding in self._detector.analyze_output(self._tail).findings:
            if finding.kind.value not in self._seen:
                self._seen.add(finding.kind.value)
                new.append(finding)
        return tuple(new)


# ---------------------------------------------------------------------------------------------------------
# Adaptive strictness
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntegrityCounters:
    """Cumulative counters read from the node: link health, validators, stages and the owner."""

    corruptions: int = 0
    """Corruption detected anywhere: corrupt frames, tokens failing their checksum, bad activations,
    spot-check mismatches, invalid deltas."""
    retransmits: int = 0
    """Frames the links sent again."""


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    enabled: bool = True
    window_s: float = 30.0
    """Retransmits are counted over this sliding window."""
    raise_corruptions: int = 1
    """New corruption events (since the previous observation) that raise the level."""
    raise_retransmits: int = 50
    """Retransmits within ``window_s`` that raise the level."""
    min_raise_interval_s: float = 5.0
    """At most one raise per this interval (a burst counts once, then has to persist)."""
    clean_window_s: float = 60.0
    """Time without any trigger after which the level falls back one step."""

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.clean_window_s <= 0 or self.min_raise_interval_s < 0:
            raise ValueError("window_s and clean_window_s must be positive, min_raise_interval_s >= 0")
        if self.raise_corruptions < 1 or self.raise_retransmits < 1:
            raise ValueError("raise thresholds must be at least 1")


@dataclass(frozen=True, slots=True)
class AdaptiveStatistics:
    """Where adaptive strictness stands: the node's base level, the raised floor, what a new request gets."""

    enabled: bool
    base: str
    floor: str
    effective: str
    raises: int
    lowers: int
    last_reason: str

    def as_dict(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "base": self.base,
            "floor": self.floor,
            "effective": self.effective,
            "raises": self.raises,
            "lowers": self.lowers,
            "last_reason": self.last_reason,
        }


class AdaptiveStrictness:
    """Raises the validation level of new requests when integrity counters move; lowers it after a clean
    window. Pure: the caller passes the time and the cumulative counters to :meth:`observe`.

    State: ``floor``, the least level a new request runs at (``off`` means no raise). A trigger (new
    corruption, or too many retransmits in the window) moves the floor one step above ``max(floor, base)``,
    at most once per ``min_raise_interval_s``; ``clean_window_s`` without a trigger moves it one step down,
    and once it is back at ``base`` or below the raise is over (floor ``off``). A request runs at
    ``max(requested, floor)``: adaptation never lowers what a request or the node asked for.
    """

    def __init__(
        self, base: ValidationLevel, config: AdaptiveConfig | None = None, *, clock: Callable[[], float]
    ) -> None:
        self.base = base
        self.config = config or AdaptiveConfig()
        self.clock = clock
        self.floor = ValidationLevel.OFF
        self.raises = 0
        self.lowers = 0
        self.last_trigger: float | None = None
        self.last_reason = ""
        self._last_raise: float | None = None
        self._last: IntegrityCounters | None = None
        self._retransmits: deque[tuple[float, int]] = deque(maxlen=4096)

    def effective(self, requested: ValidationLevel | None = None) -> ValidationLevel:
        """The level a new request that asked for ``requested`` (None: the node's base) runs at."""
        return level_max(self.base if requested is None else requested, self.floor)

    def observe(self, counters: IntegrityCounters, now: float | None = None) -> ValidationLevel:
        """Take the counters as of ``now``; returns the floor after applying them."""
        now = self.clock() if now is None else now
        cfg = self.config
        previous, self._last = self._last, counters
        if not cfg.enabled:
            return self.floor
        if previous is None:
            self._retransmits.append((now, counters.retransmits))
            return self.floor
        new_corruptions = max(0, counters.corruptions - previous.corruptions)
        self._retransmits.append((now, counters.retransmits))
        while self._retransmits and now - self._retransmits[0][0] > cfg.window_s:
            self._retransmits.popleft()
        oldest = self._retransmits[0][1] if self._retransmits else counters.retransmits
        recent_retransmits = max(0, counters.retransmits - oldest)
        reason = ""
        if new_corruptions >= cfg.raise_corruptions:
            reason = f"{new_corruptions} corruption(s) detected"
        elif recent_retransmits >= cfg.raise_retransmits:
            reason = f"{recent_retransmits} retransmits within {cfg.window_s:.0f}s"
        if reason:
            self.last_trigger = now
            self.last_reason = reason
            if self._last_raise is None or now - self._last_raise >= cfg.min_raise_interval_s:
                target = level_max(self.floor, self.base).raised()
                if target is not self.floor and target.rank > self.base.rank:
                    self.floor = target
                    self.raises += 1
                self._last_raise = now
        elif (
            self.floor is not ValidationLevel.OFF
            and self.last_trigger is not None
            and now - self.last_trigger >= cfg.clean_window_s
        ):
            lowered = self.floor.lowered()
            self.floor = ValidationLevel.OFF if lowered.rank <= self.base.rank else lowered
            self.lowers += 1
            self.last_trigger = now  # the next step down needs another clean window
        return self.floor

    def statistics(self) -> AdaptiveStatistics:
        return AdaptiveStatistics(
            enabled=self.config.enabled,
            base=self.base.value,
            floor=self.floor.value,
            effective=self.effective().value,
            raises=self.raises,
            lowers=self.lowers,
            last_reason=self.last_reason,
        )

    def snapshot(self) -> dict[str, object]:
        return self.statistics().as_dict()
