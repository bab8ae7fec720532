"""Byte-level BPE (GGUF ``tokenizer.ggml.model == "gpt2"``) with each family's llama.cpp pre-tokenizer.

The BPE merges run in the Hugging Face ``tokenizers`` library: a BPE model over the vocabulary and merges,
behind a pre-tokenizer that applies, one after the other, the regular expressions llama.cpp uses for the
model's ``tokenizer.ggml.pre`` (each one isolates its matches inside the pieces the previous one left),
then GPT-2's byte-to-character mapping.

Two rare cases where ``tokenizers`` alone would differ from llama.cpp are detected and tokenized on a slower
exact path: a character whose bytes have no token in the vocabulary (both drop it, but llama.cpp keeps it as
a barrier nothing merges across), and an unassigned code point (llama.cpp's splitter makes it a piece of its
own).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["PRE_TOKENIZERS", "ByteLevelBPE", "PreTokenizerSpec", "byte_level_bytes", "byte_level_decode_map"]


def byte_level_decode_map() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, ...) map, in byte
    order, to the code points starting at U+0100.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    printable_set = set(printable)
    table: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable_set:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = byte_level_decode_map()
_BYTE_TO_CHAR = {b: ch for ch, b in _BYTE_LEVEL.items()}

# The `regex` module (a dependency) knows Unicode's unassigned code points (\p{Cn}); it ships no type stubs.
_regex: Any = importlib.import_module("regex")
_UNASSIGNED: Any = _regex.compile(r"\p{Cn}")
_UNASSIGNED_SPLIT: Any = _regex.compile(r"(\p{Cn})")


def byte_level_bytes(piece: str) -> bytes:
    """Bytes of a byte-level BPE token string; characters outside the table pass through as UTF-8."""
    try:
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    except KeyError:
        return b"".join(bytes([_BYTE_LEVEL[ch]]) if ch in _BYTE_LEVEL else ch.encode() for ch in piece)


# ------------------------------------------------------------------------------------ pre-tokenizers
# The regular expressions llama.cpp applies for each `tokenizer.ggml.pre` (llama-vocab.cpp), in order.

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Letters of the deepseek-llm pre-tokenizer, written as escapes: several are not in Unicode normal form C.
_DEEPSEEK_LETTERS = (
    "\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-"
    "\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-"
    "\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-"
    "\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-"
    "\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-z" + _DEEPSEEK_LETTERS + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")
_FALCON = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    "[0-9][0-9][0-9]",
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + f"{_CONTRACTIONS}?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + f"{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_BLOOM = (r" ?[^(\s|.,!?…。，、।۔،)]+",)


@dataclass(frozen=True, slots=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes for one ``tokenizer.ggml.pre`` family."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's default when the GGUF has no tokenizer.ggml.add_bos_token

    def build(self) -> pre_tokenizers.PreTokenizer:
        steps: list[pre_tokenizers.PreTokenizer] = [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False) for pattern in self.regexes
        ]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
        return pre_tokenizers.Sequence(steps)


def _names(spec: PreTokenizerSpec, *names: str) -> dict[str, PreTokenizerSpec]:
    return dict.fromkeys(names, spec)


PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": PreTokenizerSpec(_DEFAULT),
    **_names(
        PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True),
        *("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
    ),
    **_names(PreTokenizerSpec((_LLAMA3,)), "dbrx", "smaug-bpe", "chatglm-bpe"),
    "glm4": PreTokenizerSpec((_LLAMA3,), ignore_merges=True),
    "deepseek-llm": PreTokenizerSpec(_DEEPSEEK_LLM),
    **_names(PreTokenizerSpec(_DEEPSEEK3), "deepseek-v3", "hunyuan-dense"),
    "deepseek-coder": PreTokenizerSpec(_DEEPSEEK_CODER),
    "falcon": PreTokenizerSpec(_FALCON),
    **_names(
        PreTokenizerSpec((r"\p{N}", _GPT2)),
        *("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
    ),
    **_names(
        PreTokenizerSpec((_GPT2,)),
        *("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "mellum", "a.x-4.0"),
    ),
    **_names(
        PreTokenizerSpec((_QWEN2,)),
        *("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez", "kormo", "solar-open", "grok-2"),
    ),
    "qwen35": PreTokenizerSpec((_QWEN35,)),
    **_names(PreTokenizerSpec(_GPT4O), "gpt-4o", "llama4", "minimax-m2"),
    "tekken": PreTokenizerSpec(_TEKKEN, ignore_merges=True, add_bos=True),
    **_names(PreTokenizerSpec(_BLOOM), "bloom", "poro-chat", "gpt3-finnish"),
}


class ByteLevelBPE:
    """The BPE of a byte-level vocabulary: ids of text that holds no special tokens."""

    kind = "byte-level-bpe"
    space_prefix = False

    def __init__(self, hf: HFTokenizer, merges: Sequence[str]) -> None:
        self.hf = hf
        self.hf.encode_special_tokens = True  # special tokens are split by the caller, never by `tokenizers`
        self._merges = tuple(merges)
        missing = [ch for ch in _BYTE_LEVEL if hf.token_to_id(ch) is None]
        self._missing_bytes = bytes(sorted(_BYTE_LEVEL[ch] for ch in missing))
        self._missing_split: re.Pattern[str] | None = (
            re.compile("[" + "".join(re.escape(ch) for ch in sorted(missing)) + "]") if missing else None
        )

    def token_bytes(self, token: str) -> bytes:
        return byte_level_bytes(token)

    def encode(self, text: str, after_special: bool, at_start: bool = True) -> list[int]:
        """BPE ids of ``text``; the fast path is the ``tokenizers`` pipeline (see the module docstring)."""
        del after_special  # byte-level BPE adds no prefix space
        if _UNASSIGNED.search(text) is not None:
            return self._encode_exact(text)
        ids: list[int] = self.hf.encode(text, add_special_tokens=False).ids
        if self._missing_bytes:
            data = text.encode("utf-8")
            if len(data.translate(None, self._missing_bytes)) != len(data):
                return self._encode_exact(text)
        return ids

    @staticmethod
    def _to_chars(text: str) -> str:
        return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8"))

    def _encode_exact(self, text: str) -> list[int]:
        """llama.cpp's rules on top of the ``tokenizers`` pre-tokenizer and BPE model (slow path)."""
        pre = self.hf.pre_tokenizer
        model = self.hf.model
        pieces = pre.pre_tokenize_str(text) if pre is not None else [(self._to_chars(text), (0, len(text)))]
        ids: list[int] = []
        for piece, _ in pieces:
            original = bytes(_BYTE_LEVEL[ch] for ch in piece).decode("utf-8")
            for part in _UNASSIGNED_SPLIT.split(original):
                if not part:
                    continue
                encoded = self._to_chars(part)
                # Characters missing from the vocabulary are dropped and separate the merges around them.
                for run in self._missing_split.split(encoded) if self._missing_split else [encoded]:
                    if run:
                        ids.extend(token.id for token in model.tokenize(run))
        return ids

    def state(self) -> dict[str, Any]:
        pre_state = self.hf.pre_tokenizer.__getstate__() if self.hf.pre_tokenizer is not None else b"null"
        model_state = json.loads(self.hf.model.__getstate__())
        return {
            "kind": self.kind,
            "pre_tokenizer": json.loads(pre_state),
            "ignore_merges": bool(model_state.get("ignore_merges", False)),
            "merges": self._merges,
        }
