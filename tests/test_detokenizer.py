"""Streaming detokenizer tests: pieces concatenate to ``decode`` and never split a character."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_stable.tokenizer import Tokenizer, byte_level_decode_map
from exo_stable.tokenizer.detokenizer import StreamingDetokenizer

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf)


@pytest.fixture(scope="module")
def byte_ids(tok: Tokenizer) -> dict[int, int]:
    """Byte value -> id of the single-byte token, for the bytes the vocabulary has."""
    out: dict[int, int] = {}
    for ch, b in byte_level_decode_map().items():
        tid = tok.token_to_id(ch)
        if tid is not None:
            out[b] = tid
    return out


def _stream(tok: Tokenizer, ids: list[int], *, skip_special: bool = False) -> tuple[list[str], str]:
    detok = StreamingDetokenizer(tok, skip_special=skip_special)
    pieces = [detok.add_token(i) for i in ids]
    return pieces, detok.finalize()


def _check_stream(tok: Tokenizer, ids: list[int], *, skip_special: bool = False) -> list[str]:
    pieces, tail = _stream(tok, ids, skip_special=skip_special)
    full = tok.decode(ids, skip_special=skip_special)
    assert "".join(pieces) + tail == full
    # Every piece is emitted only once it is final: what was emitted after k tokens is a prefix of the
    # decode of those k tokens followed by anything (here: the real continuation, and an ASCII one).
    emitted = ""
    for k, piece in enumerate(pieces, start=1):
        emitted += piece
        assert full.startswith(emitted)
        assert tok.decode([*ids[:k], *tok.encode("x")], skip_special=skip_special).startswith(emitted)
    return pieces


# ------------------------------------------------------------------------------------------- tables


def _oracle_texts(oracle: dict[str, Any]) -> list[tuple[str, list[int]]]:
    out: list[tuple[str, list[int]]] = []
    for case in oracle["cases"]:
        if "text" in case:
            out.append((case["text"], case["ids"]))
        else:
            out.append((case["rendered"], case["prompt_ids"]))
            if "\ufffd" not in case.get("greedy_text", "\ufffd"):
                out.append((case["greedy_text"], case["greedy_ids"]))
    return out


def test_oracle_texts_stream_exactly(tok: Tokenizer, oracle: dict[str, Any]) -> None:
    texts = _oracle_texts(oracle)
    assert len(texts) >= 18
    for text, oracle_ids in texts:
        # The greedy stream ends with <|im_end|>; the server stops before decoding it.
        ids = [i for i in oracle_ids if i != 2]
        pieces = _check_stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        assert "\ufffd" not in "".join(pieces)
        if not any(tok.is_special(i) for i in ids):
            assert tok.decode(ids) == text or text.startswith(tok.decode(ids))


@pytest.mark.parametrize(
    "text",
    [
        "日本語のテキスト",
        "用中文说你好，世界。",
        "안녕하세요",
        "Héllo naïve café, Zürich, Ångström",
        "Family: 👨\u200d👩\u200d👧 flags: 🇫🇷🇯🇵 skin: 👍🏽 😀",
        "e\u0301 combining",
        "שלום مرحبا",
    ],
)
def test_text_streams_exactly(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _check_stream(tok, ids)
    assert "".join(pieces) == text


@pytest.mark.parametrize("text", ["é", "日", "😀", "a日b😀c", "Ångström 你好"])
def test_byte_by_byte_holds_back_incomplete_characters(tok: Tokenizer, byte_ids: dict[int, int], text: str) -> None:
    data = text.encode("utf-8")
    ids = [byte_ids[b] for b in data]
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) == text and tail == ""
    assert all(p == "" or p in text for p in pieces)
    # A piece appears exactly when a character's last byte arrives.
    complete_at = []
    pos = 0
    for ch in text:
        pos += len(ch.encode("utf-8"))
        complete_at.append(pos - 1)
    assert [i for i, p in enumerate(pieces) if p] == complete_at


@pytest.mark.parametrize(
    ("raw", "expected_pieces", "expected_tail"),
    [
        (b"\x80A", ["\ufffd", "A"], ""),  # a stray continuation byte is invalid at once
        (b"\xe6\x97A", ["", "", "\ufffdA"], ""),  # truncated character followed by ASCII
        (b"A\xe6\x97", ["A", "", ""], "\ufffd"),  # truncated at the end of the stream
        (b"\xe6\x97\xa5", ["", "", "日"], ""),
        # An encoded surrogate is never valid (Python's decoder reports it once the third byte arrives).
        (b"\xed\xa0\x80", ["", "", "\ufffd\ufffd\ufffd"], ""),
        (b"\xf0\x9f\x98", ["", "", ""], "\ufffd"),
    ],
)
def test_invalid_utf8_matches_full_decode(
    tok: Tokenizer, byte_ids: dict[int, int], raw: bytes, expected_pieces: list[str], expected_tail: str
) -> None:
    ids = [byte_ids[b] for b in raw]
    pieces, tail = _stream(tok, ids)
    assert pieces == expected_pieces
    assert tail == expected_tail
    assert "".join(pieces) + tail == tok.decode(ids) == raw.decode("utf-8", errors="replace")


def test_special_tokens(tok: Tokenizer, byte_ids: dict[int, int]) -> None:
    ids = [*tok.encode("Hi"), 2, *tok.encode(" there")]
    assert "".join(_stream(tok, ids)[0]) == "Hi<|im_end|> there"
    assert "".join(_stream(tok, ids, skip_special=True)[0]) == "Hi there"
    # A special token after a truncated character: its text is plain ASCII, so the character is invalid.
    ids = [byte_ids[0xE6], 2]
    assert "".join(_stream(tok, ids)[0]) == tok.decode(ids) == "\ufffd<|im_end|>"
    # Skipped special tokens do not interrupt a character.
    ids = [byte_ids[0xE6], byte_ids[0x97], 2, byte_ids[0xA5]]
    assert "".join(_stream(tok, ids, skip_special=True)[0]) == tok.decode(ids, skip_special=True) == "日"


def test_finalize_once_and_no_tokens_after(tok: Tokenizer, byte_ids: dict[int, int]) -> None:
    detok = StreamingDetokenizer(tok)
    assert detok.add_token(byte_ids[0xE6]) == ""
    assert detok.pending_bytes == b"\xe6"
    assert detok.finalize() == "\ufffd"
    assert detok.finalize() == ""
    with pytest.raises(RuntimeError):
        detok.add_token(byte_ids[0x41])
    assert detok.token_count == 1


# --------------------------------------------------------------------------------------- properties


@st.composite
def _token_ids(draw: st.DrawFn, tok: Tokenizer, byte_ids: dict[int, int]) -> list[int]:
    """Random id sequences mixing any vocabulary id, single-byte tokens (often high bytes) and real text."""
    high = sorted(b for b in byte_ids if b >= 0x80)
    item = st.one_of(
        st.integers(0, tok.vocab_size - 1).map(lambda i: [i]),
        st.sampled_from(high).map(lambda b: [byte_ids[b]]),
        st.sampled_from(sorted(byte_ids.values())).map(lambda i: [i]),
        st.text(max_size=6).map(tok.encode),
        st.sampled_from([0, 1, 2]).map(lambda i: [i]),
    )
    chunks = draw(st.lists(item, max_size=25))
    return [i for chunk in chunks for i in chunk]


@_SETTINGS
@given(data=st.data())
def test_stream_equals_decode(tok: Tokenizer, byte_ids: dict[int, int], data: st.DataObject) -> None:
    ids = data.draw(_token_ids(tok, byte_ids))
    skip = data.draw(st.booleans())
    _check_stream(tok, ids, skip_special=skip)


@_SETTINGS
@given(data=st.data())
def test_emitted_text_is_final_whatever_follows(tok: Tokenizer, byte_ids: dict[int, int], data: st.DataObject) -> None:
    """No U+FFFD is emitted early: what was emitted stays a prefix whatever tokens come next."""
    head = data.draw(_token_ids(tok, byte_ids))
    tail = data.draw(_token_ids(tok, byte_ids))
    pieces, _ = _stream(tok, head)
    emitted = "".join(pieces)
    full = tok.decode([*head, *tail])
    assert full.startswith(emitted)
    assert emitted.count("\ufffd") == full[: len(emitted)].count("\ufffd")


@_SETTINGS
@given(text=st.text())
def test_stream_of_encoded_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _check_stream(tok, ids)
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in tok.decode(ids)
