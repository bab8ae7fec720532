"""BPE over raw UTF-8 with SentencePiece-style spaces (GGUF ``tokenizer.ggml.model == "gemma4"``).

As llama.cpp does for Gemma 4: spaces become U+2581, the text is cut into runs of newlines and runs of
other characters, a run of newlines that is itself a token is that token, and every other run is merged by
rank through the merges list; characters that are no token are written as byte tokens (``<0x0A>``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tokenizers import models

from exo_stable.tokenizer._meta import TokenizerError
from exo_stable.tokenizer.spm import SPACE

__all__ = ["RawBPE"]

_RUNS = re.compile(r"[^\n]+|\n+")


class RawBPE:
    """Merges by rank on raw characters, with ``<0xAB>`` byte fallback."""

    kind = "raw-bpe"
    space_prefix = False

    def __init__(self, tokens: Sequence[str], merges: Sequence[str]) -> None:
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        pairs: list[tuple[str, str]] = []
        for merge in merges:
            cut = merge.find(" ", 1)
            if cut < 0:
                raise TokenizerError(f"malformed merge {merge!r} in 'tokenizer.ggml.merges'")
            pairs.append((merge[:cut], merge[cut + 1 :]))
        self._vocab = vocab
        self._merges = tuple(merges)
        self._model = models.BPE(vocab=vocab, merges=pairs, byte_fallback=True)

    def encode(self, text: str, after_special: bool, at_start: bool = True) -> list[int]:
        del after_special
        ids: list[int] = []
        for run in _RUNS.findall(text.replace(" ", SPACE)):
            whole = self._vocab.get(run) if run[0] == "\n" else None
            if whole is not None:
                ids.append(whole)
            else:
                ids.extend(token.id for token in self._model.tokenize(run))
        return ids

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "merges": self._merges}
