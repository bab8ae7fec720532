"""StreamAssembler: turns one request's token chunks, as they arrive, into clean text deltas. Pure logic.

One assembler lives at the request owner for each request. It validates every chunk
(:class:`TokenValidator`: fields, request, checksum, plan epoch, vocabulary), drops duplicates, holds chunks
that arrive early in a bounded reorder buffer, and delivers positions ``0, 1, 2, ...`` exactly once, in
order (invariant I2, decided by :class:`SequenceIntegrityChecker`) to a :class:`TextStream`, which
detokenizes without breaking multi-byte characters and decides stop/finish in one place (I3).

What it never does: use a chunk that failed validation, trust a chunk's ``finish_reason`` (only the
TextStream decides finishing), or hold more than ``window`` positions ahead of the next one (I7). After
the request finishes every further chunk is ignored and the buffers are freed.

Positions to ask for again are reported in :attr:`AssemblyStep.missing` once, when they become known to be
missing (a gap below a later arrival, a chunk that failed validation, a chunk too far ahead);
:meth:`StreamAssembler.missing_positions` lists everything outstanding, for an owner that re-asks on a
timer. Only positions inside the window (and below ``max_tokens``) are ever reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from exo_stable.engine.sampling import Pick
from exo_stable.engine.textstream import Delta, FinishReason, TextStream
from exo_stable.pipeline.validators import SequenceIntegrityChecker, TokenValidator
from exo_stable.tokenizer import Tokenizer
from exo_stable.wire.messages import RecoveryAction, TokenChunk, ValidationError, ValidationResult

__all__ = ["AssemblerStats", "AssemblyStep", "StreamAssembler"]


@dataclass(frozen=True, slots=True)
class AssemblyStep:
    """What one accepted chunk produced.

    ``deltas``: text to send now, each with the tokens it completes (only deltas with text or a finish
    reason). ``missing``: positions newly known to be missing, to ask for again. ``rejected``: why the chunk
    was not used, if it was not. ``duplicate``: the chunk's position had already arrived (with a different
    token id it is also ``rejected``).
    """

    deltas: tuple[Delta, ...] = ()
    missing: tuple[int, ...] = ()
    rejected: ValidationResult | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class AssemblerStats:
    """A snapshot of one assembler's counters (for health pages and tests)."""

    accepted: int
    """Tokens delivered to the text stream."""
    duplicates: int
    """Chunks for a position that had already arrived with the same token id (dropped)."""
    conflicts: int
    """Chunks for a position that had already arrived with a different token id (rejected)."""
    rejected: Mapping[ValidationError, int] = field(default_factory=dict)
    """Rejected chunks by error (conflicting duplicates count here under ``DUPLICATE`` too)."""
    reordered: int = 0
    """Chunks that arrived ahead of the next expected position and were buffered."""
    max_buffered: int = 0
    """The most chunks the reorder buffer ever held."""
    buffered: int = 0
    """Chunks in the reorder buffer now."""
    gaps_requested: int = 0
    """Positions reported in :attr:`AssemblyStep.missing` over the assembler's life."""
    ignored_after_finish: int = 0
    """Chunks that arrived after the request finished."""

    @property
    def rejected_total(self) -> int:
        """All rejected chunks."""
        return sum(self.rejected.values())


_NOTHING = AssemblyStep()


class StreamAssembler:
    """Validate, dedupe, reorder and detokenize one request's token chunks (see the module docstring)."""

    def __init__(
        self,
        request_id: str,
        tokenizer: Tokenizer,
        *,
        max_tokens: int,
        stop: Sequence[str] = (),
        plan_epoch: int = 0,
        window: int = 256,
        eos_ids: Iterable[int] | None = None,
        verify_checksum: bool = True,
    ) -> None:
        """``window``: positions ``[next, next + window)`` are accepted; later ones are rejected.
        ``verify_checksum`` False (validation level ``off``): tokens' end-to-end checksums are not checked."""
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.request_id = request_id
        self.window = window
        self.max_tokens = max_tokens
        self._stream = TextStream(tokenizer, stop=stop, eos_ids=eos_ids, max_tokens=max_tokens)
        self._vocab_size = tokenizer.vocab_size
        self._verify_checksum = verify_checksum
        self._validator = TokenValidator(
            tokenizer.vocab_size, request_id=request_id, plan_epoch=plan_epoch, verify_checksum=verify_checksum
        )
        self._checker = SequenceIntegrityChecker()
        self._buffer: dict[int, TokenChunk] = {}
        self._frontier = -1  # the highest position known to exist (bounded by window when used)
        self._reported: set[int] = set()  # positions reported missing and not yet filled
        self._duplicates = 0
        self._conflicts = 0
        self._rejected: dict[ValidationError, int] = {}
        self._reordered = 0
        self._max_buffered = 0
        self._gaps_requested = 0
        self._ignored = 0

    # ------------------------------------------------------------------------------------------ state

    @property
    def finished(self) -> bool:
        """Whether the request has finished (stop, EOS, max tokens or :meth:`finish_length`)."""
        return self._stream.finished

    @property
    def finish_reason(self) -> FinishReason | None:
        """``stop`` or ``length`` once finished."""
        return self._stream.finish_reason

    @property
    def next_position(self) -> int:
        """The position the assembler waits for."""
        return self._checker.next_position

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The accepted token ids, in order (those that count towards usage)."""
        return tuple(self._stream.completion_ids)

    @property
    def text(self) -> str:
        """All the text emitted so far."""
        return self._stream.text

    def statistics(self) -> AssemblerStats:
        """A snapshot of the counters."""
        return AssemblerStats(
            accepted=len(self._stream.completion_ids),
            duplicates=self._duplicates,
            conflicts=self._conflicts,
            rejected=dict(self._rejected),
            reordered=self._reordered,
            max_buffered=self._max_buffered,
            buffered=len(self._buffer),
            gaps_requested=self._gaps_requested,
            ignored_after_finish=self._ignored,
        )

    def rebind(self, plan_epoch: int) -> None:
        """The request moved to plan ``plan_epoch`` (recovery): from now on only its chunks are valid.

        Positions already delivered stay delivered; anything buffered from the old plan is dropped, since
        the new plan sends every position from the next one on.
        """
        self._validator = TokenValidator(
            self._vocab_size, request_id=self.request_id, plan_epoch=plan_epoch, verify_checksum=self._verify_checksum
        )
        self._buffer.clear()
        self._checker.clear()
        self._reported.clear()
        self._frontier = self._checker.next_position - 1

    def missing_positions(self) -> tuple[int, ...]:
        """Every position outstanding: not arrived, yet below a later arrival (within the window)."""
        if self.finished:
            return ()
        nxt = self._checker.next_position
        upto = min(self._frontier + 1, nxt + self.window, self.max_tokens)
        return tuple(p for p in range(nxt, upto) if p not in self._buffer)

    # ------------------------------------------------------------------------------------------ input

    def accept(self, chunk: TokenChunk) -> AssemblyStep:
        """Take one chunk; return the deltas it releases, positions to ask for again, and any rejection."""
        if self.finished:
            self._ignored += 1
            return _NOTHING
        pos = chunk.sequence_position
        result = self._validator.validate_token(chunk)
        if not result.is_valid:
            return self._reject(result, pos if result.suggested_action is RecoveryAction.REGENERATE else None)
        nxt = self._checker.next_position
        if pos < nxt:
            return self._duplicate(chunk, self._stream.completion_ids[pos])
        if pos >= self.max_tokens:
            detail = f"position {pos} is beyond max_tokens {self.max_tokens}"
            return self._reject(_error(ValidationError.BAD_FIELD, RecoveryAction.NONE, detail), None)
        if pos >= nxt + self.window:
            detail = (
                f"position {pos} is {pos - nxt} ahead of the next expected position {nxt}, beyond the reorder "
                f"window of {self.window}: ask for it again later"
            )
            return self._reject(_error(ValidationError.OUT_OF_ORDER, RecoveryAction.RETRANSMIT, detail), pos)
        held = self._buffer.get(pos)
        if held is not None:
            return self._duplicate(chunk, held.token_id)

        self._frontier = max(self._frontier, pos)
        self._reported.discard(pos)
        if self._checker.observe(pos) == "ahead":
            self._buffer[pos] = chunk
            self._reordered += 1
            self._max_buffered = max(self._max_buffered, len(self._buffer))
            return AssemblyStep(missing=self._new_missing())
        deltas = self._deliver(chunk, pos)
        return AssemblyStep(deltas=deltas, missing=self._new_missing())

    def finish_length(self) -> Delta:
        """End the request for lack of room (the context is full): flush held text, finish with ``length``."""
        delta = self._stream.finish_length()
        self._release()
        return delta

    # ------------------------------------------------------------------------------------------ inside

    def _deliver(self, chunk: TokenChunk, pos: int) -> tuple[Delta, ...]:
        """Push ``chunk``'s token and every buffered successor through the text stream, in order."""
        deltas: list[Delta] = []
        nxt = self._checker.next_position
        while True:
            pick = None if chunk.logprob is None else Pick(chunk.token_id, chunk.logprob, chunk.top_logprobs)
            delta = self._stream.push(chunk.token_id, pick)
            if not delta.empty:
                deltas.append(delta)
            pos += 1
            if self._stream.finished or pos >= nxt:
                break
            chunk = self._buffer.pop(pos)
        if self._stream.finished:
            self._release()
        return tuple(deltas)

    def _duplicate(self, chunk: TokenChunk, known: int) -> AssemblyStep:
        pos = chunk.sequence_position
        if chunk.token_id == known:
            self._duplicates += 1
            return AssemblyStep(duplicate=True)
        self._conflicts += 1
        where = "delivered" if pos < self._checker.next_position else "buffered"
        detail = (
            f"conflicting duplicate at position {pos}: token {known} was already {where}, "
            f"this chunk (rank {chunk.source_device_rank}) carries {chunk.token_id}"
        )
        result = _error(ValidationError.DUPLICATE, RecoveryAction.RESTART_PIPELINE, detail)
        self._count(result)
        return AssemblyStep(rejected=result, duplicate=True)

    def _reject(self, result: ValidationResult, ask_again: int | None) -> AssemblyStep:
        """Count a rejection; ``ask_again`` is a position to request again (when it is still needed)."""
        self._count(result)
        nxt = self._checker.next_position
        forced: int | None = None
        if ask_again is not None and nxt <= ask_again < self.max_tokens and ask_again not in self._buffer:
            self._frontier = max(self._frontier, ask_again)
            if ask_again < nxt + self.window:
                forced = ask_again
        new = set(self._new_missing())
        if forced is not None and forced not in new:
            # Reported before, but a rejection is a new event: ask for that position again.
            new.add(forced)
            self._gaps_requested += 1
        return AssemblyStep(missing=tuple(sorted(new)), rejected=result)

    def _count(self, result: ValidationResult) -> None:
        error = result.error_type or ValidationError.BAD_FIELD
        self._rejected[error] = self._rejected.get(error, 0) + 1

    def _new_missing(self) -> tuple[int, ...]:
        """Outstanding positions not reported before; they count as reported from now on."""
        new = tuple(p for p in self.missing_positions() if p not in self._reported)
        self._reported.update(new)
        self._gaps_requested += len(new)
        return new

    def _release(self) -> None:
        """The request is over: free the buffers (I7)."""
        self._buffer.clear()
        self._reported.clear()
        self._checker.clear()


def _error(error: ValidationError, action: RecoveryAction, detail: str) -> ValidationResult:
    return ValidationResult(is_valid=False, error_type=error, suggested_action=action, detail=detail)
