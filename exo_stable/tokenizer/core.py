"""The :class:`Tokenizer`: llama.cpp's special-token rules around a family's text model, plus chat prompts.

The text between special tokens is tokenized by a *text model* chosen from the vocabulary's kind: byte-level
BPE (:mod:`.bytelevel`), SentencePiece (:mod:`.spm`), raw-UTF-8 BPE (:mod:`.rawbpe`) or a Hugging Face
``tokenizer.json`` pipeline (:mod:`.hfjson`). Around it this class follows llama.cpp:

* Special tokens split the text *before* the text model. Control tokens (GGUF token type 3, or Hugging
  Face added tokens flagged ``special``) are matched only with ``parse_special=True``; user-defined tokens
  (type 4, or non-special added tokens) are always matched. Matching goes through the special tokens from the
  longest to the shortest, each one claiming all its occurrences in the still unclaimed text (llama.cpp's
  ``tokenizer_st_partition``).
* Between special tokens the text is one span: template text and message content around it are tokenized
  together, exactly as llama.cpp tokenizes the rendered prompt.
* In :meth:`Tokenizer.encode_chat` special-token strings inside message *content* stay plain text: only
  occurrences lying entirely in template text are parsed as special tokens.

Decoding is faithful: :meth:`Tokenizer.decode` concatenates the tokens' bytes (keeping special tokens' text
unless ``skip_special``) and turns invalid UTF-8 into U+FFFD (``errors="replace"``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer as HFTokenizer

from exo_stable.tokenizer.chat import (
    ChatMessage,
    check_no_special_text,
    compile_template,
    normalize_messages,
    reads_content_parts,
    render_with_content_spans,
)

__all__ = ["EOG_TEXTS", "TextModel", "Tokenizer"]

#: Token texts that llama.cpp treats as end-of-generation (besides the eos/eot/eom ids).
EOG_TEXTS = frozenset(
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
        "<|return|>",
        "<|call|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
    }
)


_C_SPACE = " \t\n\v\f\r"  # C's isspace(), which llama.cpp's LSTRIP / RSTRIP use


class TextModel(Protocol):
    """Tokenizes text that holds no special tokens."""

    kind: str
    #: Whether text after a special token gets a space put before it (SentencePiece's prefix space).
    space_prefix: bool

    def encode(self, text: str, after_special: bool, at_start: bool) -> list[int]:
        """Ids of ``text``; ``after_special`` is true at the start of the text and after a special token,
        ``at_start`` only at the start of the text."""
        ...

    def state(self) -> dict[str, Any]:
        """What determines the model's output, for the fingerprint (JSON-serialisable)."""
        ...


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


class Tokenizer:
    """A model's tokenizer with llama.cpp-compatible special-token handling and its chat template.

    Build it with :meth:`from_gguf`, :meth:`from_gguf_metadata` or :meth:`from_hf_dir`. Instances are
    immutable after construction and safe to share between threads.
    """

    def __init__(
        self,
        *,
        model: TextModel,
        tokens: Sequence[str],
        token_bytes: Sequence[bytes],
        control_ids: Iterable[int],
        user_defined_ids: Iterable[int],
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
        pre_tokenizer_name: str,
        hf: HFTokenizer | Callable[[], HFTokenizer] | None = None,
        lstrip_ids: Iterable[int] = (),
        rstrip_ids: Iterable[int] = (),
    ) -> None:
        """Prefer the ``from_*`` constructors; this one takes already validated parts."""
        self.model = model
        self._hf = hf
        self._tokens: tuple[str, ...] = tuple(tokens)
        self._control: frozenset[int] = frozenset(control_ids)
        self._user_defined: frozenset[int] = frozenset(user_defined_ids) - self._control
        self.vocab_size: int = len(self._tokens)
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = eos_id
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        self.add_bos: bool = add_bos
        self.chat_template: str | None = chat_template
        self.pre_tokenizer_name: str = pre_tokenizer_name
        if len(token_bytes) != self.vocab_size:
            raise ValueError("token_bytes must hold one entry per token")
        for tid in (*self._control, *self._user_defined, *self.eos_ids, *([bos_id] if bos_id is not None else [])):
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"token id {tid} is outside the vocabulary (size {self.vocab_size})")
        self._token_bytes: tuple[bytes, ...] = tuple(token_bytes)
        self._ids: dict[str, int] = {}
        for i, tok in enumerate(self._tokens):
            self._ids.setdefault(tok, i)
        # Longest first, as llama.cpp's special-token cache is sorted; ties keep id order.
        by_len = sorted(self._control | self._user_defined, key=lambda i: (-len(self._tokens[i]), i))
        self._specials_all: tuple[tuple[str, int], ...] = tuple((self._tokens[i], i) for i in by_len if self._tokens[i])
        self._specials_always: tuple[tuple[str, int], ...] = tuple(
            (t, i) for t, i in self._specials_all if i in self._user_defined
        )
        self._template = compile_template(chat_template) if chat_template is not None else None
        # Special tokens that swallow the whitespace before / after them (llama.cpp's LSTRIP / RSTRIP).
        self._lstrip: frozenset[int] = frozenset(lstrip_ids)
        self._rstrip: frozenset[int] = frozenset(rstrip_ids)

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
        from exo_stable.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata

        return tokenizer_from_gguf_metadata(metadata)

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Load a Hugging Face / MLX model directory's tokenizer (``tokenizer.json`` and its companions)."""
        from exo_stable.tokenizer.hfjson import tokenizer_from_hf_dir

        return tokenizer_from_hf_dir(Path(path))

    def save_hf_dir(self, path: Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``, from which :meth:`from_hf_dir` loads.

        Byte-level BPE is written as it runs; SentencePiece as the BPE-with-byte-fallback form ``transformers``
        uses for it (merges ordered by the merged piece's score), which gives the same ids.
        """
        if self._hf is None:
            raise ValueError(f"a {self.model.kind} tokenizer cannot be written as tokenizer.json")
        hf = self._hf if isinstance(self._hf, HFTokenizer) else self._hf()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf.save(str(path / "tokenizer.json"))
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
        return self._token_bytes[self._check_id(token_id)]

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of a token (byte-level encoded for byte-level BPE)."""
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or None."""
        return self._ids.get(token)

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a control token (GGUF type 3 or a ``special`` added token), e.g. <|im_end|>.

        User-defined tokens are not special: they decode to their text even with ``skip_special``.
        """
        return token_id in self._control

    @property
    def special_ids(self) -> frozenset[int]:
        """The control tokens' ids."""
        return self._control

    @property
    def space_prefix(self) -> bool:
        """Whether the model writes a space before text that follows a special token (SentencePiece).

        A completion's first token then starts with that space, which is not part of the answer; the
        text stream drops it, as mlx-lm and ``transformers`` do when decoding.
        """
        return self.model.space_prefix

    @property
    def kind(self) -> str:
        """The text model: ``byte-level-bpe``, ``sentencepiece``, ``raw-bpe`` or ``tokenizer.json``."""
        return self.model.kind

    # ------------------------------------------------------------------------------------------ encode

    def _partition(
        self, text: str, specials: Sequence[tuple[str, int]], protected: Sequence[tuple[int, int]]
    ) -> list[int | tuple[int, int]]:
        """Split ``text`` on special tokens: ids for matches, (start, end) ranges for the text between.

        Follows llama.cpp: tokens from longest to shortest each claim all their non-overlapping occurrences
        in the still-unclaimed text. Control-token occurrences overlapping a ``protected`` span (message
        content) are left as text; user-defined tokens are matched everywhere, as llama.cpp always does.
        Tokens marked lstrip / rstrip also take the whitespace before / after them (Phi-3's specials).
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
                    left = hit
                    if tok_id in self._lstrip:
                        while left > cursor and text[left - 1] in _C_SPACE:
                            left -= 1
                    if left > cursor:
                        out.append((cursor, left))
                    out.append(tok_id)
                    if tok_id in self._rstrip:
                        while stop < end and text[stop] in _C_SPACE:
                            stop += 1
                    cursor = search = stop
                if cursor < end:
                    out.append((cursor, end))
            pieces = out
        return pieces

    def _encode(self, text: str, parse_special: bool, protected: Sequence[tuple[int, int]] = ()) -> list[int]:
        specials = self._specials_all if parse_special else self._specials_always
        if not specials:
            return self.model.encode(text, True, True) if text else []
        ids: list[int] = []
        after_special = True
        for piece in self._partition(text, specials, protected):
            if isinstance(piece, int):
                ids.append(piece)
                after_special = True
            else:
                ids.extend(self.model.encode(text[piece[0] : piece[1]], after_special, piece[0] == 0))
                after_special = False
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

    def _renderer(self, add_generation_prompt: bool, tools: Sequence[Mapping[str, Any]] | None, extra: Any) -> Any:
        template = self._template
        if template is None:
            raise ValueError("this model has no chat template")
        variables: dict[str, Any] = {
            "bos_token": self._tokens[self.bos_id] if self.bos_id is not None else "",
            "eos_token": self._tokens[self.eos_id] if self.eos_id is not None else "",
            "add_generation_prompt": add_generation_prompt,
            "tools": [dict(t) for t in tools] if tools is not None else None,
            "documents": None,
            **extra,
        }

        def render(messages: list[dict[str, Any]]) -> str:
            return template.render(messages=messages, **variables)

        return render

    @cached_property
    def _typed_content(self) -> bool:
        return self._template is not None and reads_content_parts(self._renderer(False, None, {}))

    @staticmethod
    def _extra(enable_thinking: bool | None) -> dict[str, Any]:
        return {} if enable_thinking is None else {"enable_thinking": enable_thinking}

    def render_chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool | None = None,
    ) -> str:
        """The prompt text the model's chat template renders for ``messages``.

        ``tools`` (OpenAI-style function definitions) and ``enable_thinking`` are handed to the template,
        the latter only when given. Raises ValueError for an unknown role or content that is neither a
        string nor text parts, and jinja2's TemplateError when the template rejects the conversation.
        """
        render = self._renderer(add_generation_prompt, tools, self._extra(enable_thinking))
        text: str = render(normalize_messages(messages, typed_content=self._typed_content))
        return text

    def encode_chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        """Token ids of the rendered chat prompt.

        Special tokens in the template's own text are parsed; special-token strings inside message content
        are plain text, and inside tools, tool calls or names they are refused (ValueError). Text between
        special tokens is one span, as when llama.cpp tokenizes the rendered prompt with special-token
        parsing. A BOS is prepended when the model asks for one (``add_bos``) and the prompt does not
        already start with it.
        """
        render = self._renderer(add_generation_prompt, tools, self._extra(enable_thinking))
        normalized = normalize_messages(messages, typed_content=self._typed_content)
        specials = [tok for tok, _ in self._specials_all]
        check_no_special_text(normalized, tools, [tok for tok, i in self._specials_all if i in self._control])
        text, spans = render_with_content_spans(render, normalized, specials)
        ids = self._encode(text, True, spans)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    # ------------------------------------------------------------------------------------- fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        header = {
            "format": 2,
            "model": self.model.state(),
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
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """A stable sha256 over vocabulary, text model, special tokens and chat template."""
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, pre={self.pre_tokenizer_name!r}, "
            f"bos={self.bos_id}, eos_ids={sorted(self.eos_ids)})"
        )
