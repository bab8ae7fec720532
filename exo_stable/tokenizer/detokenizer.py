"""Streaming detokenization: turn generated token ids into text piece by piece.

:class:`StreamingDetokenizer` feeds each token's raw bytes (:meth:`Tokenizer.token_bytes`) into an
incremental UTF-8 decoder with ``errors="replace"``. The decoder holds back the bytes of a character that is
not complete yet, so no piece ever ends in the middle of a multi-byte character, and it replaces a byte
sequence with U+FFFD only once that sequence can no longer become valid -- exactly where
``bytes.decode("utf-8", errors="replace")`` of the whole output puts one. Hence the concatenation of all
pieces (including :meth:`StreamingDetokenizer.finalize`) equals ``tokenizer.decode(ids)``, and each token
costs O(its byte length) work.

Control tokens (e.g. ``<|im_end|>``) are decoded to their text like :meth:`Tokenizer.decode` does; pass
``skip_special=True`` to drop them (then the output equals ``tokenizer.decode(ids, skip_special=True)``).
"""

from __future__ import annotations

import codecs

from exo_stable.tokenizer import Tokenizer

__all__ = ["StreamingDetokenizer"]


class StreamingDetokenizer:
    """Incrementally decodes a stream of token ids into text without breaking multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        """Start an empty stream for ``tokenizer``; ``skip_special`` drops control tokens' text."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._finished = False
        self.token_count = 0

    def add_token(self, token_id: int) -> str:
        """Feed one token; return the text it completes (possibly empty while a character is pending)."""
        if self._finished:
            raise RuntimeError("add_token() after finalize()")
        data = self._tokenizer.token_bytes(token_id)
        self.token_count += 1
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(data, final=False)

    def add_tokens(self, token_ids: list[int] | tuple[int, ...]) -> str:
        """Feed several tokens; return the text they complete."""
        return "".join(self.add_token(t) for t in token_ids)

    @property
    def pending_bytes(self) -> bytes:
        """The bytes held back because they may still become part of a character."""
        buffered, _ = self._decoder.getstate()
        return buffered

    def finalize(self) -> str:
        """End the stream: return the remaining text (U+FFFD for an incomplete trailing character)."""
        if self._finished:
            return ""
        self._finished = True
        return self._decoder.decode(b"", final=True)
