"""Byte-level BPE tokenizer that reproduces llama.cpp's token ids, plus chat-template rendering.

A :class:`Tokenizer` is built either from GGUF metadata (``tokenizer.ggml.*`` keys) or from a Hugging Face /
MLX model directory (``tokenizer.json`` + ``tokenizer_config.json``). The BPE itself runs in the Hugging Face
``tokenizers`` library (a BPE model over the GGUF vocabulary and merges, with the pre-tokenizer llama.cpp
uses for the model's ``tokenizer.ggml.pre``); everything around it -- special-token partitioning, chat
templates, byte decoding -- is implemented here so that it follows llama.cpp's rules:

* Special tokens split the text *before* BPE. Control tokens (GGUF token type 3, or Hugging Face added
  tokens flagged ``special``) are matched only with ``parse_special=True``; user-defined tokens (type 4, or
  non-special added tokens) are always matched, as in llama.cpp and ``tokenizers``. Matching goes through
  the special tokens from the longest to the shortest, each one claiming all its occurrences in the text
  that is still unclaimed (llama.cpp's ``tokenizer_st_partition``).
* Between special tokens the text is one BPE span: template text and message content around it are
  tokenized together, exactly as llama.cpp tokenizes the rendered prompt.
* In :meth:`Tokenizer.encode_chat` special-token strings that appear inside message *content* stay plain
  text: only occurrences lying entirely in template text are parsed as special tokens.

Two rare cases where ``tokenizers`` alone would differ from llama.cpp are detected and tokenized on a slower
exact path: a character whose bytes have no token in the vocabulary (SmolLM2 lacks e.g. ``\x16`` and the
lead bytes of U+40000..U+BFFFF; both drop it, but llama.cpp keeps it as a barrier nothing merges across), and
an unassigned code point (llama.cpp's GPT-2 splitter makes it a piece of its own).

Decoding is faithful: :meth:`Tokenizer.decode` keeps the text of special tokens unless ``skip_special`` is
given, and turns byte sequences that are not valid UTF-8 into U+FFFD (``errors="replace"``).
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = [
    "CHAT_ROLES",
    "ChatMessage",
    "Tokenizer",
    "TokenizerError",
    "byte_level_decode_map",
]

#: Roles accepted in chat messages.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

# GGUF token types (llama.cpp's ``llama_token_type``).
_TT_NORMAL = 1
_TT_UNKNOWN = 2
_TT_CONTROL = 3
_TT_USER_DEFINED = 4
_TT_UNUSED = 5
_TT_BYTE = 6

# Control tokens that llama.cpp treats as end-of-generation by their text (besides eos/eot/eom ids).
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
    }
)

# The GPT-2 pre-tokenizer regex as llama.cpp (and the ByteLevel pre-tokenizer) applies it.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerError(ValueError):
    """The tokenizer description is unsupported or malformed."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message: a role (system, user, assistant or tool) and its text."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class _PreTokenizerSpec:
    """How llama.cpp pre-tokenizes for one ``tokenizer.ggml.pre`` family."""

    build: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool
    verified: bool  # checked against llama.cpp reference ids in this project's tests


def _smollm_pre() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: regex_exprs = {"\\p{N}", <gpt-2 regex>}: every digit on its own, then GPT-2's split.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _regex_pre(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )

    return build


_PRE_TOKENIZERS: dict[str, _PreTokenizerSpec] = {
    # llama.cpp groups these pre-tokenizer names under the same regex list as 'smollm'.
    **{
        name: _PreTokenizerSpec(_smollm_pre, ignore_merges=False, verified=name == "smollm")
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
    },
    "gpt-2": _PreTokenizerSpec(_gpt2_pre, ignore_merges=False, verified=False),
    "llama-bpe": _PreTokenizerSpec(_regex_pre(_LLAMA3_REGEX), ignore_merges=True, verified=False),
    "qwen2": _PreTokenizerSpec(_regex_pre(_QWEN2_REGEX), ignore_merges=False, verified=False),
}


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


def _byte_level_bytes(piece: str) -> bytes:
    """Bytes of a byte-level BPE token string; characters outside the table pass through as UTF-8."""
    try:
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    except KeyError:
        return b"".join(bytes([_BYTE_LEVEL[ch]]) if ch in _BYTE_LEVEL else ch.encode() for ch in piece)


# --------------------------------------------------------------------------------------------------------
# Metadata value coercion (GGUF values arrive from mlx as mx.array scalars/vectors, lists or str).


def _to_python(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def _meta_int(metadata: Mapping[str, Any], key: str) -> int | None:
    if key not in metadata:
        return None
    value = _to_python(metadata[key])
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenizerError(f"GGUF metadata {key!r} should be an integer, found {value!r}")
    return value


def _meta_bool(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    if key not in metadata:
        return default
    value = _to_python(metadata[key])
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, bool | int):
        raise TokenizerError(f"GGUF metadata {key!r} should be a boolean, found {value!r}")
    return bool(value)


def _meta_str_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    if key not in metadata:
        raise TokenizerError(f"GGUF metadata lacks {key!r}")
    value = _to_python(metadata[key])
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise TokenizerError(f"GGUF metadata {key!r} should be a list of strings")
    return list(value)


def _meta_str(metadata: Mapping[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenizerError(f"GGUF metadata {key!r} should be a string, found {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------------
# Chat templates


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template the way Hugging Face ``apply_chat_template`` does (sandboxed)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _normalize_messages(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    for index, message in enumerate(messages):
        role: Any
        content: Any
        if isinstance(message, ChatMessage):
            role, content = message.role, message.content
        elif isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        else:
            raise ValueError(f"message {index} is neither a ChatMessage nor a mapping: {type(message).__name__}")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected one of {sorted(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {index} content must be a string, found {type(content).__name__}")
        out.append(ChatMessage(role, content))
    return out


def _spans_overlap(spans: Sequence[tuple[int, int]], starts: Sequence[int], a: int, b: int) -> bool:
    """Whether [a, b) overlaps any of the sorted, disjoint ``spans`` (``starts`` are their starts)."""
    i = bisect.bisect_left(starts, b) - 1
    while i >= 0:
        s, e = spans[i]
        if e > a and e > s:
            return True
        if e <= a:
            return False
        i -= 1
    return False


# --------------------------------------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE tokenizer with llama.cpp-compatible special-token handling and a chat template.

    Build it with :meth:`from_gguf`, :meth:`from_gguf_metadata` or :meth:`from_hf_dir`. Instances are
    immutable after construction and safe to share between threads.
    """

    def __init__(
        self,
        *,
        hf: HFTokenizer,
        tokens: Sequence[str],
        merges: Sequence[str],
        control_ids: Iterable[int],
        user_defined_ids: Iterable[int],
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
        pre_tokenizer_name: str,
    ) -> None:
        """Prefer the ``from_*`` constructors; this one takes already validated parts."""
        self._hf = hf
        self._hf.encode_special_tokens = True  # control tokens are split here, never by `tokenizers`
        self._tokens: tuple[str, ...] = tuple(tokens)
        self._merges: tuple[str, ...] = tuple(merges)
        self._control: frozenset[int] = frozenset(control_ids)
        self._user_defined: frozenset[int] = frozenset(user_defined_ids)
        self.vocab_size: int = len(self._tokens)
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = eos_id
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        self.add_bos: bool = add_bos
        self.chat_template: str | None = chat_template
        self.pre_tokenizer_name: str = pre_tokenizer_name
        for tid in (
            *self._control,
            *self._user_defined,
            *self.eos_ids,
            *([bos_id] if bos_id is not None else []),
        ):
            if not 0 <= tid < self.vocab_size:
                raise TokenizerError(f"token id {tid} is outside the vocabulary (size {self.vocab_size})")
        self._token_bytes: tuple[bytes, ...] = tuple(
            tok.encode("utf-8") if (i in self._control or i in self._user_defined) else _byte_level_bytes(tok)
            for i, tok in enumerate(self._tokens)
        )
        # Longest first, as llama.cpp's special-token cache is sorted; ties keep id order.
        by_len = sorted(self._control | self._user_defined, key=lambda i: (-len(self._tokens[i]), i))
        self._specials_all: tuple[tuple[str, int], ...] = tuple((self._tokens[i], i) for i in by_len if self._tokens[i])
        self._specials_always: tuple[tuple[str, int], ...] = tuple(
            (t, i) for t, i in self._specials_all if i in self._user_defined
        )
        missing = [ch for ch in _BYTE_LEVEL if self._hf.token_to_id(ch) is None]
        self._lossy_bytes = bool(missing)
        self._missing_split: re.Pattern[str] | None = (
            re.compile("[" + "".join(re.escape(ch) for ch in sorted(missing)) + "]") if missing else None
        )
        self._template: jinja2.Template | None = _compile_template(chat_template) if chat_template is not None else None

    # ---------------------------------------------------------------------------------------- builders

    @classmethod
    def from_gguf(cls, path: Path) -> Tokenizer:
        """Load the tokenizer of a GGUF model file (reads its metadata with ``mlx``)."""
        import mlx.core as mx

        loaded: Any = mx.load(str(path), return_metadata=True)
        metadata: Mapping[str, Any] = loaded[1]
        return cls.from_gguf_metadata(metadata)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""
        model = _meta_str(metadata, "tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"unsupported tokenizer model tokenizer.ggml.model={model!r}; only 'gpt2' (byte-level BPE) is supported"
            )
        pre = _meta_str(metadata, "tokenizer.ggml.pre") or "default"
        spec = _PRE_TOKENIZERS.get(pre)
        if spec is None:
            raise TokenizerError(
                f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: {sorted(_PRE_TOKENIZERS)}"
            )
        tokens = _meta_str_list(metadata, "tokenizer.ggml.tokens")
        merges = _meta_str_list(metadata, "tokenizer.ggml.merges")
        n = len(tokens)
        if "tokenizer.ggml.token_type" in metadata:
            types_raw = _to_python(metadata["tokenizer.ggml.token_type"])
            if not isinstance(types_raw, list) or len(types_raw) != n:
                raise TokenizerError("GGUF metadata 'tokenizer.ggml.token_type' does not match the token list")
            types = [int(t) for t in types_raw]
        else:
            types = [_TT_NORMAL] * n
        control = [i for i, t in enumerate(types) if t == _TT_CONTROL]
        user_defined = [i for i, t in enumerate(types) if t == _TT_USER_DEFINED]

        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        pairs: list[tuple[str, str]] = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise TokenizerError(f"malformed merge {merge!r} in 'tokenizer.ggml.merges'")
            pairs.append((left, right))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=spec.ignore_merges))
        hf.pre_tokenizer = spec.build()
        hf.decoder = decoders.ByteLevel()
        if control:
            hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        if user_defined:
            hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])

        bos = _meta_int(metadata, "tokenizer.ggml.bos_token_id")
        eos = _meta_int(metadata, "tokenizer.ggml.eos_token_id")
        eog = {
            tid
            for key in ("eos", "eot", "eom")
            if (tid := _meta_int(metadata, f"tokenizer.ggml.{key}_token_id")) is not None and 0 <= tid < n
        }
        eog.update(i for i in control if tokens[i] in _EOG_TEXTS)
        return cls(
            hf=hf,
            tokens=tokens,
            merges=merges,
            control_ids=control,
            user_defined_ids=user_defined,
            bos_id=bos if bos is not None and 0 <= bos < n else None,
            eos_id=eos if eos is not None and 0 <= eos < n else None,
            eos_ids=eog,
            add_bos=_meta_bool(metadata, "tokenizer.ggml.add_bos_token", default=False),
            chat_template=_meta_str(metadata, "tokenizer.chat_template"),
            pre_tokenizer_name=pre,
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Load a Hugging Face / MLX model directory's byte-level BPE tokenizer.

        Reads ``tokenizer.json`` (vocabulary, merges, pre-tokenizer, added tokens), ``tokenizer_config.json``
        (``chat_template``, ``bos_token``, ``eos_token``, ``add_bos_token``), ``chat_template.jinja`` if
        present, and ``generation_config.json``'s ``eos_token_id`` for extra stop tokens.
        """
        path = Path(path)
        tj_path = path / "tokenizer.json"
        if not tj_path.is_file():
            raise TokenizerError(f"{path} has no tokenizer.json")
        spec_json: dict[str, Any] = json.loads(tj_path.read_text(encoding="utf-8"))
        model = spec_json.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"unsupported tokenizer.json model type {model.get('type')!r}; only BPE is supported")
        if "ByteLevel" not in json.dumps(spec_json.get("pre_tokenizer")) or spec_json.get("normalizer"):
            raise TokenizerError(
                "only byte-level BPE tokenizers without a normalizer are supported; found pre_tokenizer="
                f"{json.dumps(spec_json.get('pre_tokenizer'))[:200]} normalizer="
                f"{json.dumps(spec_json.get('normalizer'))[:200]}"
            )
        hf = HFTokenizer.from_file(str(tj_path))
        vocab = hf.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1 if vocab else 0
        tokens = [""] * size
        for tok, tid in vocab.items():
            tokens[tid] = tok
        raw_merges = model.get("merges") or []
        merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in raw_merges]
        control: list[int] = []
        user_defined: list[int] = []
        for added in spec_json.get("added_tokens") or []:
            (control if added.get("special") else user_defined).append(int(added["id"]))

        config: dict[str, Any] = {}
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text(encoding="utf-8"))

        def token_id(entry: Any) -> int | None:
            text = entry.get("content") if isinstance(entry, Mapping) else entry
            return vocab.get(text) if isinstance(text, str) else None

        bos = token_id(config.get("bos_token"))
        eos = token_id(config.get("eos_token"))
        eog = {eos} if eos is not None else set()
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
            for tid in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
                if isinstance(tid, int) and 0 <= tid < size:
                    eog.add(tid)
        eog.update(i for i in control if tokens[i] in _EOG_TEXTS)

        template: str | None = None
        jinja_path = path / "chat_template.jinja"
        if jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        else:
            raw_template = config.get("chat_template")
            if isinstance(raw_template, list):
                named = {t.get("name"): t.get("template") for t in raw_template if isinstance(t, Mapping)}
                raw_template = named.get("default")
            template = raw_template if isinstance(raw_template, str) else None

        pre_name = config.get("exo_stable_pre_tokenizer")
        return cls(
            hf=hf,
            tokens=tokens,
            merges=merges,
            control_ids=control,
            user_defined_ids=user_defined,
            bos_id=bos,
            eos_id=eos,
            eos_ids=eog,
            add_bos=bool(config.get("add_bos_token", False)),
            chat_template=template,
            pre_tokenizer_name=pre_name if isinstance(pre_name, str) else "tokenizer.json",
        )

    def save_hf_dir(self, path: Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``, from which :meth:`from_hf_dir` loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(path / "tokenizer.json"))
        config: dict[str, Any] = {
            "add_bos_token": self.add_bos,
            "bos_token": self._tokens[self.bos_id] if self.bos_id is not None else None,
            "eos_token": self._tokens[self.eos_id] if self.eos_id is not None else None,
            "exo_stable_pre_tokenizer": self.pre_tokenizer_name,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), "utf-8")
        if self.eos_ids:
            gen = {"eos_token_id": sorted(self.eos_ids)}
            (path / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")

    # ------------------------------------------------------------------------------------------ tokens

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token; control and user-defined tokens give their text as UTF-8."""
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._token_bytes[token_id]

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of a token (byte-level encoded for normal tokens)."""
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or None."""
        return self._hf.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a control token (GGUF type 3 or a ``special`` added token), e.g. <|im_end|>.

        User-defined tokens are not special: they decode to their text even with ``skip_special``.
        """
        return token_id in self._control

    @property
    def special_ids(self) -> frozenset[int]:
        """The control tokens' ids."""
        return self._control

    # ------------------------------------------------------------------------------------------ encode

    def _partition(
        self, text: str, specials: Sequence[tuple[str, int]], protected: Sequence[tuple[int, int]]
    ) -> list[int | tuple[int, int]]:
        """Split ``text`` on special tokens: ids for matches, (start, end) ranges for the text between.

        Follows llama.cpp: tokens from longest to shortest each claim all their non-overlapping occurrences
        in the still-unclaimed text. Control-token occurrences overlapping a ``protected`` span (message
        content) are left as text; user-defined tokens are matched everywhere, as llama.cpp always does.
        """
        pieces: list[int | tuple[int, int]] = [(0, len(text))] if text else []
        starts = [s for s, _ in protected]
        for tok_text, tok_id in specials:
            if tok_text not in text:
                continue
            out: list[int | tuple[int, int]] = []
            for piece in pieces:
                if isinstance(piece, int):
                    out.append(piece)
                    continue
                start, end = piece
                cursor = search = start
                while (hit := text.find(tok_text, search, end)) >= 0:
                    stop = hit + len(tok_text)
                    if protected and tok_id in self._control and _spans_overlap(protected, starts, hit, stop):
                        search = hit + 1
                        continue
                    if hit > cursor:
                        out.append((cursor, hit))
                    out.append(tok_id)
                    cursor = search = stop
                if cursor < end:
                    out.append((cursor, end))
            pieces = out
        return pieces

    def _encode_text(self, text: str) -> list[int]:
        """BPE ids of text without special tokens.

        The fast path is the ``tokenizers`` pipeline. It differs from llama.cpp in two rare situations,
        which are detected and handled by :meth:`_encode_text_exact`: a character whose bytes are missing
        from the vocabulary (both drop it, but ``tokenizers`` then lets its neighbours merge), and an
        unassigned code point (llama.cpp's GPT-2 splitter makes it a piece of its own).
        """
        if _UNASSIGNED.search(text) is not None:
            return self._encode_text_exact(text)
        ids: list[int] = self._hf.encode(text, add_special_tokens=False).ids
        if self._lossy_bytes and b"".join(self._token_bytes[i] for i in ids) != text.encode("utf-8"):
            return self._encode_text_exact(text)
        return ids

    def _encode_text_exact(self, text: str) -> list[int]:
        """llama.cpp's rules on top of the ``tokenizers`` pre-tokenizer and BPE model (slow path)."""
        pre = self._hf.pre_tokenizer
        model = self._hf.model
        pieces = pre.pre_tokenize_str(text) if pre is not None else [(text, (0, len(text)))]
        ids: list[int] = []
        for piece, _ in pieces:
            original = bytes(_BYTE_LEVEL[ch] for ch in piece).decode("utf-8")
            for part in _UNASSIGNED_SPLIT.split(original):
                if not part:
                    continue
                encoded = "".join(_BYTE_TO_CHAR[b] for b in part.encode("utf-8"))
                # Characters missing from the vocabulary are dropped and separate the merges around them.
                for run in self._missing_split.split(encoded) if self._missing_split else [encoded]:
                    if run:
                        ids.extend(token.id for token in model.tokenize(run))
        return ids

    def _encode(self, text: str, parse_special: bool, protected: Sequence[tuple[int, int]] = ()) -> list[int]:
        specials = self._specials_all if parse_special else self._specials_always
        if not specials:
            return self._encode_text(text)
        ids: list[int] = []
        for piece in self._partition(text, specials, protected):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self._encode_text(text[piece[0] : piece[1]]))
        return ids

    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS). Control tokens are recognised only with ``parse_special``."""
        return self._encode(text, parse_special)

    # ------------------------------------------------------------------------------------------ decode

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``: the tokens' bytes decoded as UTF-8 with ``errors="replace"``.

        Control tokens contribute their text unless ``skip_special`` is true.
        """
        tb = self._token_bytes
        if skip_special:
            data = b"".join(tb[self._check_id(i)] for i in ids if i not in self._control)
        else:
            data = b"".join(tb[self._check_id(i)] for i in ids)
        return data.decode("utf-8", errors="replace")

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token_id

    # -------------------------------------------------------------------------------------------- chat

    def _render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template")
        special = {
            "bos_token": self._tokens[self.bos_id] if self.bos_id is not None else "",
            "eos_token": self._tokens[self.eos_id] if self.eos_id is not None else "",
        }
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            **special,
        )

    def render_chat(
        self, messages: Sequence[ChatMessage | Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text the model's chat template renders for ``messages``.

        Raises ValueError for an unknown role or non-string content, and jinja2's TemplateError when the
        template rejects the conversation (``raise_exception``).
        """
        return self._render(_normalize_messages(messages), add_generation_prompt)

    def _render_with_content_spans(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool
    ) -> tuple[str, list[tuple[int, int]]]:
        """Render the prompt and locate the message contents in it.

        Contents are rendered wrapped in unguessable markers; the markers are then removed and their
        positions recorded. If the template transforms the content so that the marked rendering differs
        from the plain one, the contents are looked up in the plain rendering instead; content that holds
        special-token text but cannot be located is an error (it could otherwise inject control tokens).
        """
        plain = self._render(messages, add_generation_prompt)
        nonce = secrets.token_hex(8)
        open_m, close_m = f"\U000f0000{nonce}\U000f0001", f"\U000f0002{nonce}\U000f0003"
        marked_msgs = [ChatMessage(m.role, f"{open_m}{m.content}{close_m}") for m in messages]
        marked = self._render(marked_msgs, add_generation_prompt)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0
        pos = 0
        ok = True
        while True:
            o = marked.find(open_m, pos)
            if o < 0:
                tail = marked[pos:]
                ok = ok and close_m not in tail
                parts.append(tail)
                break
            c = marked.find(close_m, o + len(open_m))
            if c < 0:
                ok = False
                break
            head, body = marked[pos:o], marked[o + len(open_m) : c]
            if open_m in body or close_m in head:
                ok = False
                break
            parts.append(head)
            parts.append(body)
            length += len(head)
            spans.append((length, length + len(body)))
            length += len(body)
            pos = c + len(close_m)
        if ok and "".join(parts) == plain:
            return plain, [s for s in spans if s[1] > s[0]]

        # Fallback: find each content in order in the plain rendering.
        spans = []
        pos = 0
        for m in messages:
            found = False
            for candidate in dict.fromkeys((m.content, m.content.strip())):
                hit = plain.find(candidate, pos) if candidate else -1
                if hit >= 0:
                    spans.append((hit, hit + len(candidate)))
                    pos = hit + len(candidate)
                    found = True
                    break
            if not found and any(tok in m.content for tok, _ in self._specials_all):
                raise ValueError(
                    "the chat template transforms message content that contains special-token text; "
                    "cannot keep it as plain text"
                )
        return plain, spans

    def encode_chat(
        self, messages: Sequence[ChatMessage | Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat prompt.

        Special tokens in the template's own text are parsed; special-token strings inside message content
        are plain text. Text between special tokens is one BPE span, as when llama.cpp tokenizes the
        rendered prompt with special-token parsing. A BOS is prepended when the model asks for one
        (``add_bos``) and the prompt does not already start with it.
        """
        normalized = _normalize_messages(messages)
        text, spans = self._render_with_content_spans(normalized, add_generation_prompt)
        ids = self._encode(text, True, spans)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    # ------------------------------------------------------------------------------------- fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        pre_state = self._hf.pre_tokenizer.__getstate__() if self._hf.pre_tokenizer is not None else b"null"
        model_state = json.loads(self._hf.model.__getstate__())
        header = {
            "format": 1,
            "kind": "byte-level-bpe",
            "pre_tokenizer": json.loads(pre_state),
            "ignore_merges": bool(model_state.get("ignore_merges", False)),
            "control": sorted(self._control),
            "user_defined": sorted(self._user_defined),
            "bos": self.bos_id,
            "eos": self.eos_id,
            "eos_ids": sorted(self.eos_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }
        digest.update(json.dumps(header, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\x00tokens\x00")
        digest.update(json.dumps(self._tokens, ensure_ascii=False).encode())
        digest.update(b"\x00merges\x00")
        digest.update(json.dumps(self._merges, ensure_ascii=False).encode())
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """A stable sha256 over vocabulary, merges, pre-tokenizer, special tokens and chat template."""
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pre={self.pre_tokenizer_name!r}, bos={self.bos_id}, "
            f"eos_ids={sorted(self.eos_ids)})"
        )
