"""Constrained decoding: a request's grammar as a mask over the vocabulary, through llguidance.

A grammar (a JSON schema, any JSON object, or a Lark grammar, compiled by llguidance into its own JSON form)
travels with the request's sampling parameters. Whoever samples (the last stage, the single device, the
fallback) keeps a :class:`Constraint` per request and, before each pick, brings its matcher to exactly the
tokens before that position (rolling back or consuming as needed), so a replay or a split masks the same
tokens at the same position. llguidance was chosen over outlines-core (xgrammar needs torch): see
``benchmarks/grammar_mask.py`` for the per-token cost of both on the default model's vocabulary.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np
import numpy.typing as npt

from exo_stable.tokenizer import Tokenizer

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
"""Compact JSON: no run of whitespace for a small model to lose itself in."""


class GrammarError(ValueError):
    """The grammar cannot be compiled, or the matcher reached an error state."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text that validates against ``schema`` (None: any JSON object)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"} if schema is None else schema,
            overrides=JSON_OPTIONS,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from exc


def lark_grammar(lark: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(lark)


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads from a tokenizer: token bytes, specials, and an encoder."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = min(tokenizer.eos_ids) if tokenizer.eos_ids else 0
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            raise TypeError("text only")  # llguidance then passes strings
        return self._tokenizer.encode(text)


_lock = threading.Lock()
_cache: dict[str, llguidance.LLTokenizer] = {}


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (built once per tokenizer and process: it takes ~0.1 s)."""
    key = tokenizer.fingerprint()
    with _lock:
        found = _cache.get(key)
        if found is None:
            wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer))
            found = llguidance.LLTokenizer(wrapper, eos_token=sorted(tokenizer.eos_ids) or None)
            _cache[key] = found
        return found


def check(grammar: str, tokenizer: Tokenizer) -> None:
    """Raise :class:`GrammarError` unless ``grammar`` compiles for this tokenizer."""
    error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer))
    if error:
        raise GrammarError(error)


class Constraint:
    """One request's matcher; :meth:`allowed` gives the mask at the position after ``previous``."""

    def __init__(self, grammar: str, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        self._consumed: list[int] = []
        self._raise_if_error()

    def _raise_if_error(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    def sync(self, previous: Sequence[int]) -> None:
        """Bring the matcher to exactly ``previous`` (the completion's tokens before the position)."""
        common = 0
        for a, b in zip(self._consumed, previous, strict=False):
            if a != b:
                break
            common += 1
        if common < len(self._consumed):
            self.matcher.rollback(len(self._consumed) - common)
            del self._consumed[common:]
        for token in previous[common:]:
            self.matcher.consume_token(token)
            self._consumed.append(token)
        self._raise_if_error()

    def allowed(self, previous: Sequence[int], n_logits: int) -> npt.NDArray[np.bool_]:
        """Which of ``n_logits`` tokens may come after ``previous``."""
        self.sync(previous)
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._raise_if_error()
        mask = np.unpackbits(bits, bitorder="little")[: min(self.vocab_size, n_logits)].astype(np.bool_)
        if mask.shape[0] < n_logits:  # logits past the tokenizer's vocabulary (padding) are never allowed
            mask = np.concatenate([mask, np.zeros(n_logits - mask.shape[0], dtype=np.bool_)])
        return mask
