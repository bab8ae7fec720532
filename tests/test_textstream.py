"""Stop strings, end-of-sequence and max tokens are decided in one place, on clean text."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.engine.sampling import Pick
from exo_stable.engine.textstream import Delta, TextStream
from exo_stable.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf)


def run(stream: TextStream, ids: list[int]) -> tuple[str, str | None, int]:
    text = ""
    for i in ids:
        delta = stream.push(i)
        text += delta.text
        if delta.finish_reason:
            break
    return text, stream.finish_reason, len(stream.completion_ids)


def test_max_tokens_finishes_with_length(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four five six")
    text, reason, n = run(TextStream(tok, max_tokens=3), ids)
    assert (text, reason, n) == (tok.decode(ids[:3]), "length", 3)


def test_eos_finishes_with_stop_and_is_not_text(tok: Tokenizer) -> None:
    eos = min(tok.eos_ids)
    ids = [*tok.encode("Hello there"), eos, *tok.encode("ignored")]
    text, reason, n = run(TextStream(tok, max_tokens=50), ids)
    assert text == "Hello there"
    assert reason == "stop"
    assert n == len(tok.encode("Hello there")) + 1


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(["three"], "one two "), (["o t"], "one tw"), (["zzz", "four"], "one two three "), (["x"], None)],
)
def test_stop_strings_cut_before_the_match(tok: Tokenizer, stop: list[str], expected: str | None) -> None:
    source = "one two three four five"
    text, reason, _ = run(TextStream(tok, stop=stop, max_tokens=100), tok.encode(source))
    if expected is None:
        assert reason is None and text + TextStream(tok, max_tokens=1).finish_length().text == source
    else:
        assert (text, reason) == (expected, "stop")


def test_held_back_prefix_is_released_when_it_does_not_complete(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["two three"], max_tokens=100)
    out = "".join(stream.push(i).text for i in tok.encode("one two four"))
    assert not out.endswith("two")  # " two" may start the stop string: held back
    assert out + stream.finish_length().text == "one two four"


def test_multibyte_characters_are_never_split(tok: Tokenizer) -> None:
    source = "你好，世界。😀🎉 naïve"
    stream = TextStream(tok, max_tokens=1000)
    pieces = [stream.push(i).text for i in tok.encode(source)]
    pieces.append(stream.finish_length().text)
    assert "".join(pieces) == source
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_emitted_text_is_the_decode_up_to_the_first_stop(tok: Tokenizer, source: str, stops: list[str]) -> None:
    ids = tok.encode(source)
    if not ids:
        return
    stream = TextStream(tok, stop=stops, eos_ids=[], max_tokens=len(ids))
    text, reason, _ = run(stream, ids)
    full = tok.decode(ids)
    cuts = [full.find(s) for s in stops if s and full.find(s) >= 0]
    if cuts:
        assert reason == "stop"
        assert text == full[: min(cuts)]
    else:
        assert reason == "length"
        assert text == full


def test_push_after_finish_is_an_error(tok: Tokenizer) -> None:
    stream = TextStream(tok, max_tokens=1)
    stream.push(tok.encode("a")[0])
    with pytest.raises(RuntimeError):
        stream.push(tok.encode("b")[0])


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_the_deltas_a_consumer_keeps_carry_every_token_once(tok: Tokenizer, source: str, stops: list[str]) -> None:
    """Empty deltas are dropped; the ones kept carry each token and its pick once, with the running count."""
    ids = tok.encode(source)
    if not ids:
        return
    stream = TextStream(tok, stop=stops, eos_ids=[], max_tokens=len(ids))
    kept: list[Delta] = []
    for i, token in enumerate(ids):
        delta = stream.push(token, Pick(token, -float(i)))
        assert delta.completion_tokens == i + 1
        assert not delta.empty or (delta.token_ids, delta.picks) == ((), ())
        if not delta.empty:
            kept.append(delta)
        if delta.finish_reason:
            break
    carried = [t for d in kept for t in d.token_ids]
    assert carried == stream.completion_ids
    assert [p.token for d in kept for p in d.picks] == carried
    assert [d.finish_reason for d in kept][-1] == stream.finish_reason
    assert [d.starts for d in kept] == [True] + [False] * (len(kept) - 1)
    assert kept[0].timed(0.5).first_token_s == 0.5 and all(d.timed(0.5) is d for d in kept[1:])
