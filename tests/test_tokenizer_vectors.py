"""llama.cpp's own tokenizer test vectors (``ggml-vocab-*.gguf`` + ``.inp`` / ``.out``), none written here.

The files come from the llama-cpp-python source distribution on PyPI, fetched once into
``~/.cache/exo-stable/llama-vocab/`` (see ``tests/vocab_vectors.py``). Every case of every vocabulary
must give exactly llama.cpp's ids (``add_special=False``, ``parse_special=False``, as test-tokenizer-0 runs
them), and the ids must decode back to the text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vocab_vectors import Unreachable, fetch, read_cases, vocabularies

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


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    try:
        return fetch()
    except Unreachable as exc:
        pytest.skip(f"llama.cpp vocabulary vectors not cached and PyPI is unreachable ({exc})")


def test_every_vocabulary_with_vectors_is_classified(vocab_dir: Path) -> None:
    assert sorted(vocabularies(vocab_dir)) == sorted([*EXACT, *REFUSED])


@pytest.mark.parametrize("vocab", sorted(EXACT))
def test_vocabulary_matches_llamacpp(vocab_dir: Path, vocab: str) -> None:
    tok = Tokenizer.from_gguf(vocab_dir / f"ggml-vocab-{vocab}.gguf")
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
        Tokenizer.from_gguf(vocab_dir / f"ggml-vocab-{vocab}.gguf")
