"""Turn a request's token ids into text deltas and decide, in one place, when and why it finishes.

Pure logic: no asyncio, no MLX. The request owner feeds every token it accepts; this object returns the
text that is safe to send now (never half a UTF-8 character, never the start of what may become a stop
string) and a finish reason once the request is over: ``stop`` (end-of-sequence token or stop string)
or ``length`` (max tokens or the context is full). For a SentencePiece model the space that starts the first
piece is the tokenizer's prefix space, not text, and is dropped (as mlx-lm and ``transformers`` do).

Each :class:`Delta` carries its own counters, as mlx-lm's ``GenerationResponse`` does: the tokens it completes,
their log-probabilities, and how many tokens the request has generated so far. A consumer folds the deltas
(``exo_stable.pipeline.service.GenerationResult.add``); nothing travels beside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from exo_stable.engine.sampling import Pick
from exo_stable.tokenizer import Tokenizer
from exo_stable.tokenizer.detokenizer import StreamingDetokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Delta:
    """What accepted tokens produced: text to emit now, and the finish reason if they ended the request.

    A delta with neither text nor a finish reason is empty: consumers drop it, and its tokens ride on the next
    delta that is not (``token_ids`` and ``picks`` are the tokens since the previous non-empty delta), so that
    the deltas a consumer keeps carry every token exactly once.
    """

    text: str
    finish_reason: FinishReason | None = None
    token_ids: tuple[int, ...] = ()
    """The tokens this delta completes, in order (empty on an empty delta)."""
    picks: tuple[Pick, ...] = ()
    """Their log-probabilities, for the tokens that were sampled with them (when the request asked)."""
    completion_tokens: int = 0
    """Tokens the request has generated so far, these included (they count towards usage)."""
    first_token_s: float | None = None
    """On the delta that carries the request's first token: seconds from the start of the request to it
    (stamped by the producer, which owns the clock)."""

    @property
    def empty(self) -> bool:
        """Neither text nor a finish reason: nothing to send (its tokens ride on the next delta)."""
        return not self.text and self.finish_reason is None

    @property
    def starts(self) -> bool:
        """Whether this delta carries the request's first token."""
        return bool(self.token_ids) and len(self.token_ids) == self.completion_tokens

    def timed(self, first_token_s: float | None) -> Delta:
        """This delta with ``first_token_s`` stamped on it when it carries the first token (else itself)."""
        return replace(self, first_token_s=first_token_s) if self.starts else self


class TextStream:
    """Detokenize, apply stop strings and end-of-sequence tokens, count tokens.

    ``completion_ids`` are the tokens that count towards usage (an EOS that ended the request counts,
    as in OpenAI's API; text after a stop string is dropped but its tokens were generated and count).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: Sequence[str] = (),
        eos_ids: Iterable[int] | None = None,
        max_tokens: int,
    ) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self._detok = StreamingDetokenizer(tokenizer)
        self._drop_space = tokenizer.space_prefix  # the first piece's leading space is SentencePiece's prefix
        self._stops = tuple(s for s in stop if s)
        self._eos = frozenset(tokenizer.eos_ids if eos_ids is None else eos_ids)
        self._max_tokens = max_tokens
        self._held = ""  # decoded text not yet emitted because it may start a stop string
        self._unsent = 0  # tokens at the end of completion_ids that no non-empty delta has carried yet
        self._picks: list[Pick] = []  # their log-probabilities
        self.completion_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int, pick: Pick | None = None) -> Delta:
        """Accept the next token of the request (``pick``: its log-probabilities, when they were asked for)."""
        if self.finish_reason is not None:
            raise RuntimeError("the stream has already finished")
        self.completion_ids.append(token_id)
        self._unsent += 1
        if pick is not None:
            self._picks.append(pick)
        if token_id in self._eos:
            return self._finish("stop", self._held + self._detok.finalize())
        piece = self._detok.add_token(token_id)
        if self._drop_space and piece:
            piece, self._drop_space = piece.removeprefix(" "), False
        new_text = self._held + piece
        cut = self._find_stop(new_text)
        if cut is not None:
            return self._finish("stop", new_text[:cut])
        if len(self.completion_ids) >= self._max_tokens:
            return self._finish("length", new_text + self._detok.finalize())
        keep = self._partial_stop_suffix(new_text)
        emit, self._held = new_text[: len(new_text) - keep], new_text[len(new_text) - keep :]
        self.text += emit
        return self._delta(emit, None)

    def finish_length(self) -> Delta:
        """End the request for lack of room (context full): flush what is held."""
        if self.finish_reason is not None:
            raise RuntimeError("the stream has already finished")
        return self._finish("length", self._held + self._detok.finalize())

    def _finish(self, reason: FinishReason, text: str) -> Delta:
        cut = self._find_stop(text)
        if cut is not None:
            text, reason = text[:cut], "stop"
        self._held = ""
        self.finish_reason = reason
        self.text += text
        return self._delta(text, reason)

    def _delta(self, text: str, reason: FinishReason | None) -> Delta:
        """A delta with its counters; a non-empty one hands out the tokens not carried yet."""
        done = len(self.completion_ids)
        if not text and reason is None:
            return Delta("", completion_tokens=done)
        ids = tuple(self.completion_ids[done - self._unsent :]) if self._unsent else ()
        picks = tuple(self._picks)
        self._unsent = 0
        self._picks.clear()
        return Delta(text, reason, ids, picks, done)

    def _find_stop(self, text: str) -> int | None:
        """Index where the earliest stop string starts in ``text`` (text before it is kept)."""
        found = [i for s in self._stops if (i := text.find(s)) >= 0]
        return min(found) if found else None

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
