"""Build a :class:`Tokenizer` from a Hugging Face / MLX model directory.

Reads ``tokenizer.json`` (vocabulary, merges, normalizer, pre-tokenizer, added tokens),
``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``add_bos_token``, ``chat_template``), the chat
template from ``chat_template.jinja`` or ``chat_template.json`` when present, and the end-of-sequence ids of
``generation_config.json`` and ``config.json`` (Llama 3 and Qwen list several).

A byte-level BPE without a normalizer runs on :class:`ByteLevelBPE` (llama.cpp's rules, exact against its
vectors); anything else that ``tokenizers`` runs (Qwen's NFC normalizer, SentencePiece-style BPE with byte
fallback, Unigram) runs through the ``tokenizer.json`` pipeline itself, as ``transformers`` and mlx-lm do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from exo_stable.tokenizer._meta import TokenizerError
from exo_stable.tokenizer.bytelevel import ByteLevelBPE, byte_level_bytes
from exo_stable.tokenizer.core import EOG_TEXTS, TextModel, Tokenizer
from exo_stable.tokenizer.spm import spm_token_bytes

__all__ = ["HFPipeline", "tokenizer_from_hf_dir"]


class HFPipeline:
    """Text through the whole ``tokenizer.json`` pipeline (normalizer, pre-tokenizer, model)."""

    kind = "tokenizer.json"

    def __init__(self, hf: HFTokenizer, source: str, space_prefix: bool) -> None:
        self.hf = hf
        self.space_prefix = space_prefix
        self.hf.encode_special_tokens = True  # special tokens are split by the caller
        self._digest = hashlib.sha256(source.encode()).hexdigest()
        # Metaspace(prepend_scheme="first") puts its ▁ only before the text at the very start of the input;
        # the text after a special token is tokenized by a copy that never prepends.
        spec = json.loads(source)
        self._rest = hf
        if _never_prepend(spec.get("pre_tokenizer")):
            self._rest = HFTokenizer.from_str(json.dumps(spec))
            self._rest.encode_special_tokens = True

    def encode(self, text: str, after_special: bool, at_start: bool = True) -> list[int]:
        del after_special  # the normalizer / pre-tokenizer decide about a leading space
        ids: list[int] = (self.hf if at_start else self._rest).encode(text, add_special_tokens=False).ids
        return ids

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer.json": self._digest}


def _never_prepend(node: Any) -> bool:
    """Turn Metaspace pre-tokenizers that prepend only at the start into ones that never do; say if any did."""
    found = False
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
            found = True
        for child in node.get("pretokenizers") or []:
            found = _never_prepend(child) or found
    return found


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _ids(value: Any) -> Iterator[int]:
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, int) and not isinstance(item, bool):
            yield item


def _mentions(node: Any, type_name: str) -> bool:
    return f'"type": "{type_name}"' in json.dumps(node)


def _post_processor_adds_bos(post: Any, bos_text: str | None) -> bool:
    """Whether ``tokenizer.json``'s post-processor starts a single sequence with the BOS token."""
    if not isinstance(post, Mapping) or bos_text is None:
        return False
    if post.get("type") == "Sequence":
        return any(_post_processor_adds_bos(p, bos_text) for p in post.get("processors") or [])
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        first = single[0] if single else None
        return isinstance(first, Mapping) and (first.get("SpecialToken") or {}).get("id") == bos_text
    return False


def _decoder_strips_space(decoder: Any) -> bool:
    """Whether the decoder drops the space SentencePiece puts before a text (Strip or Metaspace)."""
    if not isinstance(decoder, Mapping):
        return False
    if decoder.get("type") == "Sequence":
        return any(_decoder_strips_space(d) for d in decoder.get("decoders") or [])
    if decoder.get("type") == "Strip":
        return decoder.get("content") == " " and int(decoder.get("start", 0)) > 0
    if decoder.get("type") == "Metaspace":
        return decoder.get("prepend_scheme", "always") != "never" and decoder.get("add_prefix_space", True) is not False
    return False


def _chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    jinja_path = path / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    raw = _read_json(path / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
        raw = named.get("default")
    return raw if isinstance(raw, str) else None


def tokenizer_from_hf_dir(path: Path) -> Tokenizer:
    """The tokenizer of an MLX / Hugging Face model directory."""
    tj_path = path / "tokenizer.json"
    if not tj_path.is_file():
        raise TokenizerError(f"{path} has no tokenizer.json")
    source = tj_path.read_text(encoding="utf-8")
    spec: dict[str, Any] = json.loads(source)
    model_spec = spec.get("model") or {}
    model_type = model_spec.get("type")
    if model_type not in ("BPE", "Unigram"):
        raise TokenizerError(f"unsupported tokenizer.json model type {model_type!r}; supported: BPE, Unigram")
    try:
        hf = HFTokenizer.from_str(source)
    except Exception as exc:
        raise TokenizerError(f"{tj_path} cannot be loaded: {exc}") from exc
    byte_level = _mentions(spec.get("pre_tokenizer"), "ByteLevel") or _mentions(spec.get("decoder"), "ByteLevel")

    vocab = hf.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    tokens = [""] * size
    for tok, tid in vocab.items():
        tokens[tid] = tok
    control: set[int] = set()
    user_defined: set[int] = set()
    lstrip: set[int] = set()
    rstrip: set[int] = set()
    for added in spec.get("added_tokens") or []:
        (control if added.get("special") else user_defined).add(int(added["id"]))
        if added.get("lstrip"):
            lstrip.add(int(added["id"]))
        if added.get("rstrip"):
            rstrip.add(int(added["id"]))
    eog_by_text = {i for i in control | user_defined if tokens[i] in EOG_TEXTS}
    control |= eog_by_text

    model: TextModel
    if byte_level and model_type == "BPE" and not spec.get("normalizer"):
        raw_merges = model_spec.get("merges") or []
        merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in raw_merges]
        model = ByteLevelBPE(hf, merges)
    else:
        model = HFPipeline(hf, source, _decoder_strips_space(spec.get("decoder")))
    if byte_level:
        plain = [byte_level_bytes(tok) for tok in tokens]
    else:
        plain = [spm_token_bytes(tok, is_byte=True) for tok in tokens]
    token_bytes = [tok.encode("utf-8") if i in control | user_defined else plain[i] for i, tok in enumerate(tokens)]

    config = _read_json(path / "tokenizer_config.json")

    def token_id(entry: Any) -> int | None:
        text = entry.get("content") if isinstance(entry, Mapping) else entry
        return vocab.get(text) if isinstance(text, str) else None

    bos = token_id(config.get("bos_token"))
    eos = token_id(config.get("eos_token"))
    eog = ({eos} if eos is not None else set()) | eog_by_text
    for name in ("generation_config.json", "config.json"):
        eog.update(tid for tid in _ids(_read_json(path / name).get("eos_token_id")) if 0 <= tid < size)
    if eos is None and eog:
        eos = min(eog)
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds_bos(spec.get("post_processor"), tokens[bos] if bos is not None else None)
    pre_name = config.get("exo_stable_pre_tokenizer")
    return Tokenizer(
        model=model,
        tokens=tokens,
        token_bytes=token_bytes,
        control_ids=control,
        user_defined_ids=user_defined,
        bos_id=bos,
        eos_id=eos,
        eos_ids=eog,
        add_bos=add_bos,
        chat_template=_chat_template(path, config),
        pre_tokenizer_name=pre_name if isinstance(pre_name, str) else "tokenizer.json",
        hf=hf,
        lstrip_ids=lstrip,
        rstrip_ids=rstrip,
    )
