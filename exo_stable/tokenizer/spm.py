"""SentencePiece-style tokenization as llama.cpp does it (GGUF ``tokenizer.ggml.model == "llama"``).

Llama 2, Mistral, TinyLlama, Phi-3 and Gemma ship a vocabulary of pieces with scores. Spaces become U+2581
("▁"), a text fragment that follows a special token (or starts the text) gets one leading space when the
model asks for it, and then adjacent symbols (initially single characters) are merged, always the pair whose
concatenation is the highest-scoring piece of the vocabulary (the leftmost pair on a tie), until no pair is a
piece. A final symbol that is not a piece is written as byte tokens (``<0x41>``).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["SPACE", "SentencePiece", "spm_as_hf", "spm_token_bytes"]

SPACE = "\u2581"
# Where a word starts: a ▁ after something else. No piece of most vocabularies crosses such a point.
_WORD_START = re.compile("(?<=[^\u2581])(?=\u2581)")
_CACHE_LIMIT = 1 << 16


def spm_token_bytes(token: str, is_byte: bool) -> bytes:
    """Bytes a piece stands for: ``<0xAB>`` byte pieces give their byte, others their text with ▁ as space."""
    if is_byte and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace(SPACE, " ").encode("utf-8")


class SentencePiece:
    """The pieces-and-scores merge of llama.cpp's SPM tokenizer."""

    kind = "sentencepiece"

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], add_space_prefix: bool) -> None:
        self._ids: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            self._ids[tok] = i  # llama.cpp's text-to-token map keeps the last of duplicate texts
        self._scores = tuple(scores)
        self.add_space_prefix = add_space_prefix
        self.space_prefix = add_space_prefix
        # When no piece holds a ▁ that follows another character, no merge can cross a word start, so words
        # are tokenized (and cached) one by one: the same ids as the whole text, much faster.
        self._by_word = not any(_WORD_START.search(tok) for tok in tokens)
        self._cache: dict[str, list[int]] = {}
        self._byte_ids: list[int | None] = []
        for b in range(256):
            found = self._ids.get(f"<0x{b:02X}>")
            if found is None and b < 0x80:
                found = self._ids.get(chr(b))
            self._byte_ids.append(found)

    def encode(self, text: str, after_special: bool, at_start: bool = True) -> list[int]:
        if self.add_space_prefix and after_special:
            text = " " + text
        text = text.replace(" ", SPACE)
        if not self._by_word:
            return self._merge(text)
        out: list[int] = []
        cache = self._cache
        for word in _WORD_START.split(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._merge(word)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)
        return out

    def _merge(self, text: str) -> list[int]:
        """llama.cpp's merge loop over one stretch of escaped text."""
        n = len(text)
        if n == 0:
            return []
        ids, scores = self._ids, self._scores
        start = list(range(n))
        size = [1] * n
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap: list[tuple[float, int, int, int]] = []

        def add_pair(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            length = size[left] + size[right]
            tid = ids.get(text[start[left] : start[left] + length])
            if tid is not None:
                # Highest score first, then the leftmost pair (llama.cpp's comparator).
                heapq.heappush(heap, (-scores[tid], left, right, length))

        for i in range(1, n):
            add_pair(i - 1, i)
        while heap:
            _, left, right, length = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != length:
                continue  # stale: one side was merged since
            size[left] = length
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_pair(prev[left], left)
            add_pair(left, nxt[left])

        out: list[int] = []
        i = 0
        while i != -1:
            piece = text[start[i] : start[i] + size[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(b for byte in piece.encode("utf-8") if (b := self._byte_ids[byte]) is not None)
            i = nxt[i]
        return out

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "scores": self._scores, "add_space_prefix": self.add_space_prefix}


def spm_as_hf(
    tokens: Sequence[str],
    scores: Sequence[float],
    add_space_prefix: bool,
    *,
    control: Sequence[int],
    user_defined: Sequence[int],
    rstrip: frozenset[int] = frozenset(),
) -> HFTokenizer:
    """The same tokenizer as a ``tokenizers`` BPE: ``tokenizer.json`` for an MLX / Hugging Face directory.

    Every split of a piece into two pieces is a merge, ranked by the merged piece's score (best first, then
    by the parts' ids); a space prefix before each text, byte fallback for characters that are no piece.
    """
    skip = set(control) | set(user_defined)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        if pid in skip:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            lid, rid = vocab.get(left), vocab.get(right)
            if lid is not None and rid is not None and lid not in skip and rid not in skip:
                ranked.append((-scores[pid], lid, rid, left, right))
    ranked.sort()
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], byte_fallback=True, fuse_unk=True))
    steps: list[normalizers.Normalizer] = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    strip: list[decoders.Decoder] = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    if control:
        hf.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False, rstrip=i in rstrip) for i in sorted(control)]
        )
    if user_defined:
        hf.add_tokens(
            [AddedToken(tokens[i], special=False, normalized=False, rstrip=i in rstrip) for i in sorted(user_defined)]
        )
    return hf
