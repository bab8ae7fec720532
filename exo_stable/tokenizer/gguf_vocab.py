"""Build a :class:`Tokenizer` from GGUF metadata (``tokenizer.ggml.*``), following llama.cpp's loader.

``tokenizer.ggml.model`` picks the text model: ``gpt2`` (byte-level BPE, with the pre-tokenizer named by
``tokenizer.ggml.pre``), ``llama`` (SentencePiece pieces and scores) or ``gemma4`` (raw-UTF-8 BPE). The
end-of-generation set is llama.cpp's: the eos, eot and eom ids plus the tokens whose text marks the end of a
turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...), which llama.cpp also treats as control tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from exo_stable.tokenizer._meta import (
    TokenizerError,
    meta_bool,
    meta_float_list,
    meta_int,
    meta_str,
    meta_str_list,
    to_python,
)
from exo_stable.tokenizer.bytelevel import PRE_TOKENIZERS, ByteLevelBPE, byte_level_bytes
from exo_stable.tokenizer.core import EOG_TEXTS, TextModel, Tokenizer
from exo_stable.tokenizer.rawbpe import RawBPE
from exo_stable.tokenizer.spm import SentencePiece, spm_as_hf, spm_token_bytes

__all__ = ["SUPPORTED_MODELS", "tokenizer_from_gguf_metadata"]

# GGUF token types (llama.cpp's ``llama_token_type``).
_TT_NORMAL = 1
_TT_UNKNOWN = 2
_TT_CONTROL = 3
_TT_USER_DEFINED = 4
_TT_BYTE = 6

SUPPORTED_MODELS = ("gpt2", "llama", "gemma4")


def _byte_level(
    metadata: Mapping[str, Any], tokens: list[str], control: set[int], user_defined: set[int]
) -> tuple[ByteLevelBPE, str, bool]:
    pre = meta_str(metadata, "tokenizer.ggml.pre") or "default"
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise TokenizerError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    merges = meta_str_list(metadata, "tokenizer.ggml.merges")
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
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(control)])
    if user_defined:
        hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in sorted(user_defined)])
    return ByteLevelBPE(hf, merges), pre, spec.add_bos


def _phi3_rstrip(metadata: Mapping[str, Any], tokens: list[str], specials: set[int]) -> set[int]:
    """llama.cpp makes Phi-3's special tokens swallow the whitespace after them (as its tokenizer.json does)."""
    name = (meta_str(metadata, "general.name") or "").lower()
    if "phi-3" not in name and "phi3" not in name:
        return set()
    ids = {tok: i for i, tok in enumerate(tokens)}
    rstrip = specials | {ids["</s>"]} if "</s>" in ids else set(specials)
    return rstrip - {ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in ids}


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer llama.cpp would build from this GGUF metadata."""
    kind = meta_str(metadata, "tokenizer.ggml.model")
    if kind not in SUPPORTED_MODELS:
        raise TokenizerError(
            f"unsupported tokenizer model tokenizer.ggml.model={kind!r}; supported: {', '.join(SUPPORTED_MODELS)}"
        )
    tokens = meta_str_list(metadata, "tokenizer.ggml.tokens")
    n = len(tokens)
    if "tokenizer.ggml.token_type" in metadata:
        types_raw = to_python(metadata["tokenizer.ggml.token_type"])
        if not isinstance(types_raw, list) or len(types_raw) != n:
            raise TokenizerError("GGUF metadata 'tokenizer.ggml.token_type' does not match the token list")
        types = [int(t) for t in types_raw]
    else:
        types = [_TT_NORMAL] * n
    eog_by_text = {i for i, tok in enumerate(tokens) if tok in EOG_TEXTS}
    control = {i for i, t in enumerate(types) if t in (_TT_CONTROL, _TT_UNKNOWN)} | eog_by_text
    user_defined = {i for i, t in enumerate(types) if t == _TT_USER_DEFINED} - control

    rstrip = _phi3_rstrip(metadata, tokens, control | user_defined)
    model: TextModel
    hf: HFTokenizer | Callable[[], HFTokenizer] | None = None
    if kind == "gpt2":
        bpe, pre, default_bos = _byte_level(metadata, tokens, control, user_defined)
        model, hf = bpe, bpe.hf
        plain = [byte_level_bytes(tok) for tok in tokens]
    elif kind == "llama":
        scores = meta_float_list(metadata, "tokenizer.ggml.scores", n)
        add_prefix = meta_bool(metadata, "tokenizer.ggml.add_space_prefix")
        spm = SentencePiece(tokens, scores, add_space_prefix=True if add_prefix is None else add_prefix)
        model = spm
        hf = partial(
            spm_as_hf,
            tokens,
            scores,
            spm.add_space_prefix,
            control=sorted(control),
            user_defined=sorted(user_defined),
            rstrip=frozenset(rstrip),
        )
        pre, default_bos = "sentencepiece", True
        plain = [spm_token_bytes(tok, t == _TT_BYTE) for tok, t in zip(tokens, types, strict=True)]
    else:
        model = RawBPE(tokens, meta_str_list(metadata, "tokenizer.ggml.merges"))
        pre, default_bos = "gemma4", True
        plain = [spm_token_bytes(tok, t == _TT_BYTE) for tok, t in zip(tokens, types, strict=True)]
    token_bytes = [tok.encode("utf-8") if i in control else plain[i] for i, tok in enumerate(tokens)]

    def token_id(key: str) -> int | None:
        tid = meta_int(metadata, f"tokenizer.ggml.{key}_token_id")
        return tid if tid is not None and 0 <= tid < n else None

    eos = token_id("eos")
    eog = {tid for key in ("eos", "eot", "eom") if (tid := token_id(key)) is not None} | eog_by_text
    add_bos = meta_bool(metadata, "tokenizer.ggml.add_bos_token")
    return Tokenizer(
        model=model,
        tokens=tokens,
        token_bytes=token_bytes,
        control_ids=control,
        user_defined_ids=user_defined,
        bos_id=token_id("bos"),
        eos_id=eos,
        eos_ids=eog,
        # llama.cpp always adds BOS for Gemma 4 (its template writes <bos> itself, so encode_chat adds none).
        add_bos=default_bos if add_bos is None or kind == "gemma4" else add_bos,
        chat_template=meta_str(metadata, "tokenizer.chat_template"),
        pre_tokenizer_name=pre,
        hf=hf,
        rstrip_ids=rstrip,
    )
