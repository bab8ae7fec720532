"""Token log-probabilities in OpenAI's two shapes (chat's ``content`` list, completions' parallel lists).

The stages send each token's log-probability with the token (``TokenChunk.logprob``); each delta carries
those of its tokens, and the request's result collects them as the deltas pass (``GenerationResult.picks``).
A :class:`LogprobCursor` hands each one out once, in order, with the delta that carries its text, so a stream
and a whole response report the same values. The token that ended the request (end of sequence) is not
reported, as OpenAI does not report it.
"""

from __future__ import annotations

from collections.abc import Iterable

from exo_stable.api import schemas as s
from exo_stable.engine.sampling import Pick
from exo_stable.pipeline.service import GenerationResult
from exo_stable.tokenizer import Tokenizer


class LogprobCursor:
    def __init__(self, tokenizer: Tokenizer, result: GenerationResult) -> None:
        self.tokenizer = tokenizer
        self.result = result
        self.sent = 0
        self._eos = frozenset(tokenizer.eos_ids)

    def take(self, final: bool) -> list[Pick]:
        """The picks not handed out yet (at the end, without the end-of-sequence token)."""
        picks = self.result.picks[self.sent :]
        self.sent += len(picks)
        if final and picks and picks[-1].token in self._eos:
            picks = picks[:-1]
        return picks

    def _text(self, token: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def chat(self, picks: Iterable[Pick]) -> list[s.TokenLogprob]:
        out = []
        for p in picks:
            text, raw = self._text(p.token)
            top = []
            for token, logprob in p.top:
                t, b = self._text(token)
                top.append(s.TopLogprob(t, logprob, b))
            out.append(s.TokenLogprob(text, p.logprob if p.logprob is not None else 0.0, raw, top))
        return out

    def completion(self, picks: Iterable[Pick], offset: int) -> tuple[s.CompletionLogprobs, int]:
        """Completions' shape, text offsets counted from ``offset``; returns it and the offset after it."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for p in picks:
            text, _ = self._text(p.token)
            tokens.append(text)
            values.append(p.logprob)
            tops.append({self._text(t)[0]: lp for t, lp in p.top})
            offsets.append(offset)
            offset += len(text)
        return s.CompletionLogprobs(tokens, values, tops, offsets), offset
