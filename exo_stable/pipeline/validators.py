"""The design's token integrity validators: tokens, sequences and text encoding. Pure logic.

- :class:`TokenValidator` checks one :class:`TokenChunk` (fields, request, plan epoch, end-to-end checksum,
  vocabulary), a list of chunks as a sequence, and text for signs of corruption.
- :class:`SequenceIntegrityChecker` is the single authority on invariant I2: positions ``0, 1, 2, ...``
  with no gap and no duplicate. It is incremental: observe positions as they arrive.
- :class:`EncodingValidator` checks text deltas and bytes (strict UTF-8), and a whole stream of deltas
  against the full decode (invariant I3).

Results use the wire's :class:`ValidationResult` and :class:`CorruptionReport`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from exo_stable.wire.messages import (
    CorruptionReport,
    CorruptionSeverity,
    CorruptionType,
    RecoveryAction,
    TokenChunk,
    ValidationError,
    ValidationResult,
)
from exo_stable.wire.validation import TokenTransferValidator

__all__ = [
    "VALID",
    "EncodingValidator",
    "Observation",
    "SequenceIntegrityChecker",
    "SequenceValidationResult",
    "TokenValidator",
    "bad_characters",
]

VALID = ValidationResult(is_valid=True)
"""The one result for a check that passed."""

REPLACEMENT = "\ufffd"
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def _is_bad(ch: str) -> bool:
    cp = ord(ch)
    return cp == 0xFFFD or 0xD800 <= cp <= 0xDFFF or ((cp < 0x20 or 0x80 <= cp <= 0x9F) and ch not in _ALLOWED_CONTROLS)


def bad_characters(text: str) -> list[int]:
    """Indices of characters in ``text`` that signal corruption.

    Those are U+FFFD (bytes that were not valid UTF-8), lone surrogates (U+D800..U+DFFF: text that cannot
    even be encoded) and C0/C1 control characters other than tab, newline and carriage return.
    """
    return [i for i, ch in enumerate(text) if _is_bad(ch)]


def _invalid(error: ValidationError, action: RecoveryAction, detail: str, confidence: float = 1.0) -> ValidationResult:
    return ValidationResult(
        is_valid=False, error_type=error, confidence_score=confidence, suggested_action=action, detail=detail
    )


def _describe_chars(text: str, indices: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(f"U+{ord(text[i]):04X} at {i}" for i in indices[:limit])
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return shown + more


# ---------------------------------------------------------------------------------------------------------
# Sequences (I2)
# ---------------------------------------------------------------------------------------------------------

Observation = Literal["next", "ahead", "duplicate"]
"""What :meth:`SequenceIntegrityChecker.observe` makes of a position."""


class SequenceIntegrityChecker:
    """Tracks which positions of one stream have arrived; the authority on "0, 1, 2, ... exactly once".

    ``next_position`` is the first position not yet received: every position below it has arrived exactly
    once (as far as this checker was told). Positions above it that arrived early are ``pending``.
    """

    def __init__(self, start: int = 0) -> None:
        """Expect positions ``start, start + 1, ...``."""
        if start < 0:
            raise ValueError(f"start must be non-negative, got {start}")
        self.start = start
        self._next = start
        self._ahead: set[int] = set()

    @property
    def next_position(self) -> int:
        """The lowest position not yet observed."""
        return self._next

    @property
    def pending(self) -> tuple[int, ...]:
        """Positions observed ahead of ``next_position``, ascending."""
        return tuple(sorted(self._ahead))

    @property
    def highest_seen(self) -> int | None:
        """The highest position observed, or None before the first."""
        if self._ahead:
            return max(self._ahead)
        return self._next - 1 if self._next > self.start else None

    def seen(self, position: int) -> bool:
        """Whether ``position`` has been observed."""
        return self.start <= position < self._next or position in self._ahead

    def observe(self, position: int) -> Observation:
        """Record that ``position`` arrived.

        ``"next"``: it is ``next_position``; the checker then moves past it and past every pending position
        that follows it without a gap. ``"ahead"``: it is later than ``next_position`` and now pending.
        ``"duplicate"``: it was observed before (or lies below ``start``); nothing changes.
        """
        if position < self._next or position in self._ahead:
            return "duplicate"
        if position > self._next:
            self._ahead.add(position)
            return "ahead"
        self._next += 1
        while self._next in self._ahead:
            self._ahead.remove(self._next)
            self._next += 1
        return "next"

    def missing(self, upto: int | None = None) -> tuple[int, ...]:
        """Positions in ``[next_position, upto)`` not yet observed; ``upto`` defaults to the highest seen + 1."""
        if upto is None:
            highest = self.highest_seen
            upto = self._next if highest is None else highest + 1
        return tuple(p for p in range(self._next, upto) if p not in self._ahead)

    def verify_token_ordering(self, positions: Iterable[int]) -> bool:
        """True when ``positions`` is exactly ``start, start + 1, ...``: in order, no gap, no duplicate."""
        expect = self.start
        for p in positions:
            if p != expect:
                return False
            expect += 1
        return True

    def clear(self) -> None:
        """Forget the pending positions (the stream is over; frees memory)."""
        self._ahead.clear()


# ---------------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SequenceValidationResult:
    """The verdict on a list of chunks meant to be one request's positions ``start, start + 1, ...``.

    ``missing``: positions between ``start`` and the highest present that no chunk holds. ``duplicates``:
    positions held by more than one chunk. ``invalid``: positions of chunks that fail
    :meth:`TokenValidator.validate_token`. ``out_of_order``: chunks whose position is below that of an
    earlier chunk. ``first_bad_position``: the lowest position that is missing, duplicated or invalid.
    """

    is_valid: bool
    missing: tuple[int, ...] = ()
    duplicates: tuple[int, ...] = ()
    invalid: tuple[int, ...] = ()
    out_of_order: int = 0
    first_bad_position: int | None = None


class TokenValidator:
    """Validates token chunks for one request: fields, request id, checksum, plan epoch, vocabulary."""

    def __init__(
        self, vocab_size: int, *, request_id: str, plan_epoch: int | None = None, verify_checksum: bool = True
    ) -> None:
        """``plan_epoch`` None accepts any epoch; otherwise chunks must carry exactly that epoch.

        ``verify_checksum`` False (validation level ``off``) skips the end-to-end checksum; every other check
        stays (they are needed to route and decode the token at all)."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.request_id = request_id
        self.plan_epoch = plan_epoch
        self.verify_checksum = verify_checksum
        self._transfer = TokenTransferValidator()

    def validate_token(self, chunk: TokenChunk) -> ValidationResult:
        """Check one chunk; the first failing check decides the error and the suggested recovery.

        In order: negative fields (``BAD_FIELD``; ``REGENERATE`` unless the position itself is negative),
        the request id (``BAD_FIELD``, ``NONE``: a misrouted chunk is dropped), the checksum
        (``CHECKSUM_MISMATCH``, ``REGENERATE`` that position), the plan epoch (``BAD_FIELD``: a stale one
        ``REGENERATE``s under the current plan, a newer one than known means the owner and the pipeline
        disagree: ``RESTART_PIPELINE``), and the token id against the vocabulary (``BAD_FIELD``,
        ``REGENERATE``).
        """
        pos = chunk.sequence_position
        if pos < 0:
            return _invalid(ValidationError.BAD_FIELD, RecoveryAction.NONE, f"negative sequence position {pos}")
        negative = [
            name
            for name, value in (
                ("token id", chunk.token_id),
                ("source rank", chunk.source_device_rank),
                ("plan epoch", chunk.plan_epoch),
            )
            if value < 0
        ]
        if negative:
            return _invalid(
                ValidationError.BAD_FIELD,
                RecoveryAction.REGENERATE,
                f"negative {', '.join(negative)} in the chunk at position {pos}",
            )
        if chunk.request_id != self.request_id:
            return _invalid(
                ValidationError.BAD_FIELD,
                RecoveryAction.NONE,
                f"chunk for request {chunk.request_id!r} reached request {self.request_id!r} (position {pos})",
            )
        if self.verify_checksum:
            checked = self._transfer.validate_token(chunk)
            if not checked.is_valid:
                return checked
        if self.plan_epoch is not None and chunk.plan_epoch != self.plan_epoch:
            if chunk.plan_epoch < self.plan_epoch:
                return _invalid(
                    ValidationError.BAD_FIELD,
                    RecoveryAction.REGENERATE,
                    f"stale plan epoch {chunk.plan_epoch} at position {pos} (current epoch {self.plan_epoch})",
                )
            return _invalid(
                ValidationError.BAD_FIELD,
                RecoveryAction.RESTART_PIPELINE,
                f"plan epoch {chunk.plan_epoch} at position {pos} is newer than the request's {self.plan_epoch}",
            )
        if chunk.token_id >= self.vocab_size:
            return _invalid(
                ValidationError.BAD_FIELD,
                RecoveryAction.REGENERATE,
                f"token id {chunk.token_id} at position {pos} is outside the vocabulary (size {self.vocab_size})",
            )
        return VALID

    def validate_sequence(self, chunks: Sequence[TokenChunk], *, start: int = 0) -> SequenceValidationResult:
        """Check that ``chunks`` are exactly positions ``start, start + 1, ...``, in order, each valid."""
        counts: dict[int, int] = {}
        invalid: set[int] = set()
        out_of_order = 0
        previous: int | None = None
        for chunk in chunks:
            pos = chunk.sequence_position
            if not self.validate_token(chunk).is_valid:
                invalid.add(pos)
            counts[pos] = counts.get(pos, 0) + 1
            if previous is not None and pos < previous:
                out_of_order += 1
            previous = pos
        below_start = {p for p in counts if p < start}
        highest = max(counts, default=start - 1)
        missing = tuple(p for p in range(start, highest + 1) if p not in counts)
        duplicates = tuple(sorted(p for p, n in counts.items() if n > 1))
        bad = set(missing) | set(duplicates) | invalid | below_start
        is_valid = not bad and out_of_order == 0
        return SequenceValidationResult(
            is_valid=is_valid,
            missing=missing,
            duplicates=duplicates,
            invalid=tuple(sorted(invalid | below_start)),
            out_of_order=out_of_order,
            first_bad_position=min(bad) if bad else None,
        )

    def detect_corruption(self, text: str) -> CorruptionReport | None:
        """Look for signs of corrupted text; None when there are none.

        See :func:`bad_characters`. ``affected_range`` is ``(first, last + 1)`` in character indices. Severity:
        control characters alone are ``LOW``, U+FFFD ``MEDIUM`` (a model may legitimately emit invalid bytes),
        lone surrogates ``HIGH``; ``CRITICAL`` when a quarter or more of the text is affected (garbled), and
        only then is recovery (regenerating the tokens) judged impossible.
        """
        bad = bad_characters(text)
        if not bad:
            return None
        kinds = {ord(text[i]) for i in bad}
        if any(0xD800 <= cp <= 0xDFFF for cp in kinds):
            severity = CorruptionSeverity.HIGH
        elif 0xFFFD in kinds:
            severity = CorruptionSeverity.MEDIUM
        else:
            severity = CorruptionSeverity.LOW
        if 4 * len(bad) >= len(text):
            severity = CorruptionSeverity.CRITICAL
        return CorruptionReport(
            corruption_type=CorruptionType.ENCODING,
            affected_range=(bad[0], bad[-1] + 1),
            severity=severity,
            recovery_possible=severity is not CorruptionSeverity.CRITICAL,
            detail=f"{len(bad)} suspicious character(s) in {len(text)}: {_describe_chars(text, bad)}",
        )


# ---------------------------------------------------------------------------------------------------------
# Encoding (I3)
# ---------------------------------------------------------------------------------------------------------


class EncodingValidator:
    """Checks that text is clean and that a stream of deltas reproduces the full decode."""

    def validate_delta(self, text: str) -> ValidationResult:
        """Fail on lone surrogates, U+FFFD or control characters other than tab, newline, carriage return.

        A U+FFFD may be the model's own output (invalid bytes it generated), so its confidence is lower.
        """
        bad = bad_characters(text)
        if not bad:
            return VALID
        kinds = {ord(text[i]) for i in bad}
        surrogate = any(0xD800 <= cp <= 0xDFFF for cp in kinds)
        confidence = 1.0 if surrogate else (0.5 if kinds == {0xFFFD} else 0.9)
        return _invalid(
            ValidationError.BAD_ENCODING,
            RecoveryAction.REGENERATE,
            f"delta has {_describe_chars(text, bad)}",
            confidence,
        )

    def validate_utf8(self, data: bytes) -> ValidationResult:
        """Strict UTF-8: overlong forms, encoded surrogates, code points above U+10FFFF and truncated
        characters are all rejected (``detail`` gives the byte offset)."""
        try:
            data.decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            return _invalid(
                ValidationError.BAD_ENCODING,
                RecoveryAction.RETRANSMIT,
                f"invalid UTF-8 at byte {exc.start}: {exc.reason} ({data[exc.start : exc.end + 3]!r})",
            )
        return VALID

    def check_stream(self, deltas: Sequence[str], full_decode: str) -> ValidationResult:
        """Invariant I3: the deltas concatenate to ``full_decode`` and hold no U+FFFD the full decode lacks.

        A delta with a U+FFFD where the full decode has another character is a multi-byte character that was
        split across deltas and emitted broken; that is named in ``detail``.
        """
        offset = 0
        for n, delta in enumerate(deltas):
            for i, ch in enumerate(delta):
                at = offset + i
                if ch == REPLACEMENT and (at >= len(full_decode) or full_decode[at] != REPLACEMENT):
                    found = repr(full_decode[at]) if at < len(full_decode) else "nothing"
                    return _invalid(
                        ValidationError.BAD_ENCODING,
                        RecoveryAction.REGENERATE,
                        f"delta {n} has U+FFFD at character {at} where the full decode has {found} "
                        "(a multi-byte character emitted broken)",
                    )
            offset += len(delta)
        joined = "".join(deltas)
        if joined != full_decode:
            at = next(
                (i for i, (a, b) in enumerate(zip(joined, full_decode, strict=False)) if a != b),
                min(len(joined), len(full_decode)),
            )
            return _invalid(
                ValidationError.BAD_ENCODING,
                RecoveryAction.REGENERATE,
                f"deltas ({len(joined)} characters) differ from the full decode ({len(full_decode)}) "
                f"at character {at}: {joined[at : at + 8]!r} versus {full_decode[at : at + 8]!r}",
            )
        return VALID
