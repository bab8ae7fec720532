"""llama.cpp's own tokenizer test vectors (``ggml-vocab-*.gguf`` + ``.inp`` / ``.out``), none written here.

The files come from the llama-cpp-python source distribution on PyPI, fetched once into
``~/.cache/exo-stable/llama-vocab/`` (see ``tests/vocab_vectors.py``). Every case of every vocabulary
must give exactly llama.cpp's ids (``add_special=False``, ``parse_special=False``, as test-tokenizer-0 runs
them), and the ids must decode back to the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vocab_vectors import load, read_cases, vocab_dir_fixture, vocabularies  # noqa: F401  (the vocab_dir fixture)

from exo_stable.tokenizer import Tokenizer, TokenizerError

# Vocabularies with vectors, and the families that use them. All must be exact.
EXACT = {
    "llama-spm": "Llama 1/2, Mistral v0.1-v0.3, TinyLlama (SentencePiece)",
    "phi-3": "Phi-3 (SentencePiece)",
    "gemma-4": "Gemma 4 (raw-UTF-8 BPE)",
    "llama-bpe": "Llama 3.x (byte-level BPE)",
    "qwen2": "Qwen2, Qwen2.5, Qwen3, Qwen3-MoE",
    "qwen35": "Qwen3.5",
    "deepseek-llm": "DeepSeek LLM",
    "deepseek-coder": "DeepSeek Coder",
    "command-r": "Command-R",
    "gpt-2": "GPT-2",
    "starcoder": "StarCoder",
    "refact": "Refact",
    "falcon": "Falcon",
    "mpt": "MPT",
}
REFUSED = {"bert-bge": "bert"}  # WordPiece embedding models: not served


def test_every_vocabulary_with_vectors_is_classified(vocab_dir: Path) -> None:
    assert sorted(vocabularies(vocab_dir)) == sorted([*EXACT, *REFUSED])


@pytest.mark.parametrize("vocab", sorted(EXACT))
def test_vocabulary_matches_llamacpp(vocab_dir: Path, vocab: str) -> None:
    tok = load(vocab_dir, vocab)
    cases = read_cases(vocab_dir, vocab)
    assert len(cases) >= 40
    wrong = [(text, expected, got) for text, expected in cases if (got := tok.encode(text)) != expected]
    assert not wrong, f"{vocab}: {len(cases) - len(wrong)}/{len(cases)} exact; first: {wrong[0]!r:.400}"
    for text, expected in cases:
        decoded = tok.decode(expected)
        if tok.kind == "sentencepiece" and text:
            decoded = decoded.removeprefix(" ")  # the space SentencePiece puts before the text
        assert decoded == text


@pytest.mark.parametrize("vocab", sorted(REFUSED))
def test_unsupported_vocabulary_is_refused_clearly(vocab_dir: Path, vocab: str) -> None:
    with pytest.raises(TokenizerError, match=repr(REFUSED[vocab])):
        load(vocab_dir, vocab)


# A tokenizer.json that no one here wrote: transformers' own GGUF-to-tokenizers converter turns the vocabulary
# into the `tokenizer.json` an HF / MLX model directory carries; loaded through Tokenizer.from_hf_dir it must
# still give llama.cpp's ids. (For other vocabularies the converter itself differs from llama.cpp.)
HF_EXACT = ("gpt-2", "phi-3", "qwen2")


def _write_hf_dir(vocab_dir: Path, vocab: str, out: Path) -> None:
    converter = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    import mlx.core as mx

    loaded: Any = mx.load(str(vocab_dir / f"ggml-vocab-{vocab}.gguf"), return_metadata=True)
    meta = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in loaded[1].items()}
    names = converter.GGUF_TOKENIZER_MAPPING["tokenizer"]
    fields = {name: meta[f"tokenizer.{key}"] for key, name in names.items() if f"tokenizer.{key}" in meta}
    backend, _ = converter.convert_gguf_tokenizer(meta["general.architecture"], fields)
    out.mkdir()
    backend.save(str(out / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]],
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("vocab", HF_EXACT)
def test_hf_tokenizer_json_matches_llamacpp(vocab_dir: Path, vocab: str, tmp_path: Path) -> None:
    _write_hf_dir(vocab_dir, vocab, tmp_path / vocab)
    tok = Tokenizer.from_hf_dir(tmp_path / vocab)
    gguf = load(vocab_dir, vocab)
    assert tok.vocab_size == gguf.vocab_size
    assert tok.chat_template == gguf.chat_template
    for text, expected in read_cases(vocab_dir, vocab):
        assert tok.encode(text) == expected, text
    assert tok.eos_ids >= {gguf.eos_id}


@pytest.fixture(scope="module")
def llama_spm(vocab_dir: Path) -> Tokenizer:
    return load(vocab_dir, "llama-spm")


@settings(max_examples=200, deadline=None)
@given(
    # Text a client can send: JSON parsers refuse lone surrogates, which UTF-8 cannot encode.
    text=st.text(
        alphabet=st.sampled_from([*" \u2581\n\tabcXYZ'.,!é日本😀", "\u00a0"]) | st.characters(codec="utf-8"),
        max_size=40,
    )
)
def test_spm_word_by_word_equals_whole_text(llama_spm: Tokenizer, text: str) -> None:
    # The word-by-word shortcut (with its cache) must give the ids of llama.cpp's merge over the whole text.
    model: Any = llama_spm.model
    assert model.encode(text, True) == model._merge((" " + text).replace(" ", "\u2581"))
    if text and "\u2581" not in text:  # an input ▁ reads back as a space, in llama.cpp too
        assert llama_spm.decode(llama_spm.encode(text)) == " " + text


def test_hf_tokenizer_json_with_a_normalizer_runs_its_own_pipeline(vocab_dir: Path, tmp_path: Path) -> None:
    # Qwen's tokenizer.json normalizes to NFC: such a file runs through tokenizers' whole pipeline.
    _write_hf_dir(vocab_dir, "qwen2", tmp_path / "qwen2")
    spec = json.loads((tmp_path / "qwen2" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFC"}
    (tmp_path / "qwen2" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = Tokenizer.from_hf_dir(tmp_path / "qwen2")
    assert tok.kind == "tokenizer.json"
    for text, expected in read_cases(vocab_dir, "qwen2"):
        assert tok.encode(text) == expected, text
    assert tok.encode("e\u0301") == tok.encode("\u00e9")  # NFC, as transformers and mlx-lm tokenize
    im_end = tok.token_to_id("<|im_end|>")
    plain = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.encode_chat([{"role": "user", "content": "hi<|im_end|>"}]).count(im_end) == plain.count(im_end)


@pytest.mark.parametrize("vocab", ["llama-spm", "phi-3"])
def test_hf_tokenizer_json_special_tokens_split_like_tokenizers(vocab_dir: Path, vocab: str, tmp_path: Path) -> None:
    # Around special tokens a SentencePiece tokenizer.json decides the prefix space itself: Metaspace with
    # prepend_scheme "first" (llama-spm here) prepends only at the very start, a Prepend normalizer (phi-3)
    # before every piece of text. The ids must be those `tokenizers` gives for the whole text.
    from tokenizers import Tokenizer as HFTokenizer

    _write_hf_dir(vocab_dir, vocab, tmp_path / vocab)
    tok = Tokenizer.from_hf_dir(tmp_path / vocab)
    reference = HFTokenizer.from_file(str(tmp_path / vocab / "tokenizer.json"))
    specials = [tok.id_to_token(i) for i in sorted(tok.special_ids)][:4]
    for text, _ in read_cases(vocab_dir, vocab)[::3]:
        for special in specials:
            for sample in (special + text, text + special + text, f"{special} {text}{special}"):
                assert (
                    tok.encode(sample, parse_special=True) == reference.encode(sample, add_special_tokens=False).ids
                ), sample


@pytest.fixture(scope="module")
def phi3_reference(vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tokenizers import Tokenizer as HFTokenizer

    out = tmp_path_factory.mktemp("phi3") / "phi-3"
    _write_hf_dir(vocab_dir, "phi-3", out)
    return HFTokenizer.from_file(str(out / "tokenizer.json"))


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list(" \n\tabcXYZ019'.,!?-()éüß日本語한국Привет½€🙂🦙\u00a0")), max_size=30)
)
def test_sentencepiece_agrees_with_tokenizers_beyond_the_vectors(
    vocab_dir: Path, phi3_reference: Any, text: str
) -> None:
    # Our SentencePiece merge (llama.cpp's algorithm) against tokenizers' BPE on the converter's merges:
    # two independent implementations, on text the vectors do not hold.
    assert load(vocab_dir, "phi-3").encode(text) == phi3_reference.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("vocab", ["llama-spm", "phi-3"])
def test_sentencepiece_written_as_tokenizer_json_keeps_its_ids(vocab_dir: Path, vocab: str, tmp_path: Path) -> None:
    # save_hf_dir writes a SentencePiece vocabulary as BPE with byte fallback (how an MLX directory carries
    # it); loaded back it must still give llama.cpp's ids, split special tokens the same way and decode alike.
    gguf = load(vocab_dir, vocab)
    gguf.save_hf_dir(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.kind == "tokenizer.json" and tok.space_prefix
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template) == (
        gguf.bos_id,
        gguf.eos_ids,
        gguf.add_bos,
        gguf.chat_template,
    )
    special = tok.id_to_token(max(tok.special_ids))
    for text, expected in read_cases(vocab_dir, vocab):
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == gguf.decode(expected)
        sample = f"{text}{special}{text}"
        assert tok.encode(sample, parse_special=True) == gguf.encode(sample, parse_special=True), sample
