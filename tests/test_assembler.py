"""StreamAssembler: validate, dedupe, reorder, detokenize; positions 0, 1, 2, ... exactly once (I2), clean text (I3)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.engine.textstream import Delta
from exo_stable.pipeline.assembler import AssemblyStep, StreamAssembler
from exo_stable.pipeline.validators import EncodingValidator
from exo_stable.tokenizer import Tokenizer
from exo_stable.wire.messages import RecoveryAction, TokenChunk, ValidationError
from exo_stable.wire.validation import TokenTransferValidator

SEAL = TokenTransferValidator().seal
REQ = "req-1"


@pytest.fixture(scope="module")
def tok(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf)


@pytest.fixture(scope="module")
def raw(oracle: dict[str, Any]) -> dict[str, list[int]]:
    """The oracle's raw texts' token ids, by case name."""
    return {c["name"]: list(c["ids"]) for c in oracle["cases"] if "ids" in c}


def chunk(pos: int, token: int, *, epoch: int = 0, request: str = REQ, finish: str | None = None) -> TokenChunk:
    return SEAL(
        TokenChunk(
            request_id=request,
            sequence_position=pos,
            token_id=token,
            source_device_rank=2,
            plan_epoch=epoch,
            finish_reason=finish,
        )
    )


def chunks(ids: list[int], **kw: Any) -> list[TokenChunk]:
    return [chunk(i, t, **kw) for i, t in enumerate(ids)]


def corrupt(c: TokenChunk) -> TokenChunk:
    """The same chunk with its token id altered after sealing."""
    return msgspec.structs.replace(c, token_id=c.token_id ^ 1)


def feed(asm: StreamAssembler, items: list[TokenChunk]) -> tuple[list[Delta], list[AssemblyStep]]:
    deltas: list[Delta] = []
    steps: list[AssemblyStep] = []
    for c in items:
        step = asm.accept(c)
        steps.append(step)
        deltas.extend(step.deltas)
    return deltas, steps


def assembler(tok: Tokenizer, **kw: Any) -> StreamAssembler:
    kw.setdefault("max_tokens", 1000)
    kw.setdefault("eos_ids", ())
    return StreamAssembler(REQ, tok, **kw)


def all_deltas_clean(deltas: list[Delta], full: str) -> None:
    assert EncodingValidator().check_stream([d.text for d in deltas], full).is_valid
    assert all(d.text or d.finish_reason for d in deltas)
    for d in deltas:
        d.text.encode("utf-8")  # no lone surrogate: every delta is whole characters
        assert "\ufffd" not in d.text or "\ufffd" in full


# ---------------------------------------------------------------------------------------------- in order


@pytest.mark.parametrize(
    "name",
    ["raw_ascii", "raw_accents", "raw_emoji", "raw_cjk", "raw_whitespace", "raw_rtl_combining", "raw_specialtext"],
)
def test_in_order(tok: Tokenizer, raw: dict[str, list[int]], name: str) -> None:
    ids = raw[name]
    asm = assembler(tok)
    deltas, steps = feed(asm, chunks(ids))
    assert all(s.missing == () and s.rejected is None and not s.duplicate for s in steps)
    assert not asm.finished and asm.next_position == len(ids)
    deltas.append(asm.finish_length())
    full = tok.decode(ids)
    assert asm.text == full and asm.token_ids == tuple(ids)
    assert asm.finish_reason == "length" and deltas[-1].finish_reason == "length"
    assert [d.finish_reason for d in deltas].count("length") == 1
    all_deltas_clean(deltas, full)
    stats = asm.statistics()
    assert (stats.accepted, stats.duplicates, stats.rejected_total, stats.reordered) == (len(ids), 0, 0, 0)


@pytest.mark.parametrize("name", ["raw_emoji", "raw_cjk", "raw_accents", "raw_rtl_combining"])
def test_multibyte_characters_are_never_split_across_deltas(
    tok: Tokenizer, raw: dict[str, list[int]], name: str
) -> None:
    ids = raw[name]
    # the case is meaningful: some tokens hold only part of a character
    assert any("\ufffd" in tok.token_bytes(t).decode("utf-8", "replace") for t in ids)
    asm = assembler(tok, max_tokens=len(ids))  # ends with "length" on the last token
    deltas, _ = feed(asm, list(reversed(chunks(ids))))
    assert asm.finish_reason == "length"
    assert "\ufffd" not in asm.text
    all_deltas_clean(deltas, tok.decode(ids))
    for d in deltas:
        assert d.text.encode("utf-8").decode("utf-8") == d.text


# ---------------------------------------------------------------------------------------------- reordering


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["raw_ascii", "raw_emoji", "raw_cjk", "raw_digits", "raw_rtl_combining"]),
    rnd=st.randoms(use_true_random=False),
    n_dupes=st.integers(0, 20),
    n_corrupt=st.integers(0, 5),
)
def test_any_arrival_order_yields_the_in_order_stream(
    tok: Tokenizer, raw: dict[str, list[int]], *, name: str, rnd: random.Random, n_dupes: int, n_corrupt: int
) -> None:
    ids = raw[name]
    good = chunks(ids)
    dupes = [rnd.choice(good) for _ in range(n_dupes)]
    bad = [corrupt(rnd.choice(good)) for _ in range(n_corrupt)]
    arrivals = [*good, *dupes, *bad]
    rnd.shuffle(arrivals)
    asm = assembler(tok, window=len(ids) + 1)
    deltas, steps = feed(asm, arrivals)
    deltas.append(asm.finish_length())
    full = tok.decode(ids)
    assert asm.token_ids == tuple(ids)
    assert asm.text == full
    all_deltas_clean(deltas, full)
    stats = asm.statistics()
    assert stats.accepted == len(ids)
    assert stats.duplicates == n_dupes
    assert stats.conflicts == 0
    assert stats.rejected.get(ValidationError.CHECKSUM_MISMATCH, 0) == n_corrupt
    assert stats.rejected_total == n_corrupt
    assert stats.buffered == 0 and stats.max_buffered <= len(ids)
    assert sum(s.duplicate for s in steps) == n_dupes
    # a position is reported missing only while it has not arrived, and only below a later arrival
    arrived: set[int] = set()
    for c, s in zip(arrivals, steps, strict=True):
        if s.rejected is None:
            arrived.add(c.sequence_position)
        assert all(p not in arrived and p <= max(arrived | {c.sequence_position}) for p in s.missing)


def test_gaps_are_reported_once_and_filled_later(tok: Tokenizer) -> None:
    ids = tok.encode("alpha beta gamma delta")
    assert len(ids) >= 4
    asm = assembler(tok)
    first = asm.accept(chunk(0, ids[0]))
    assert [d.text for d in first.deltas] == [tok.decode(ids[:1])]
    assert first.deltas[0].token_ids == (ids[0],) and first.deltas[0].completion_tokens == 1
    ahead = asm.accept(chunk(3, ids[3]))
    assert ahead.deltas == () and ahead.missing == (1, 2)
    assert asm.missing_positions() == (1, 2)
    again = asm.accept(chunk(2, ids[2]))
    assert again.deltas == () and again.missing == ()  # 1 was already reported
    assert asm.missing_positions() == (1,)
    filled = asm.accept(chunk(1, ids[1]))
    assert "".join(d.text for d in filled.deltas) == tok.decode(ids[:4])[len(tok.decode(ids[:1])) :]
    assert asm.next_position == 4 and asm.missing_positions() == ()
    stats = asm.statistics()
    assert (stats.gaps_requested, stats.reordered, stats.max_buffered) == (2, 2, 2)


# ---------------------------------------------------------------------------------------------- rejections


def test_corrupted_checksum_is_rejected_and_asked_for_again(tok: Tokenizer) -> None:
    ids = tok.encode("one two three")
    asm = assembler(tok)
    asm.accept(chunk(0, ids[0]))
    bad = asm.accept(corrupt(chunk(1, ids[1])))
    assert bad.rejected is not None and bad.rejected.error_type is ValidationError.CHECKSUM_MISMATCH
    assert bad.rejected.suggested_action is RecoveryAction.REGENERATE
    assert bad.missing == (1,) and bad.deltas == ()
    assert asm.token_ids == (ids[0],) and asm.next_position == 1
    assert asm.missing_positions() == (1,)
    # corrupted again: asked for again again
    assert asm.accept(corrupt(chunk(1, ids[1]))).missing == (1,)
    ok = asm.accept(chunk(1, ids[1]))
    assert ok.rejected is None and asm.token_ids == tuple(ids[:2]) and asm.missing_positions() == ()
    stats = asm.statistics()
    assert stats.rejected == {ValidationError.CHECKSUM_MISMATCH: 2}
    assert stats.gaps_requested == 2


def test_corrupted_chunk_at_a_buffered_or_delivered_position_is_not_asked_for(tok: Tokenizer) -> None:
    asm = assembler(tok)
    asm.accept(chunk(0, 10))
    asm.accept(chunk(2, 12))
    assert asm.missing_positions() == (1,)
    assert asm.accept(corrupt(chunk(0, 10))).missing == ()
    assert asm.accept(corrupt(chunk(2, 12))).missing == ()
    assert asm.statistics().rejected_total == 2


def test_conflicting_duplicates_are_detected(tok: Tokenizer) -> None:
    asm = assembler(tok)
    asm.accept(chunk(0, 100))
    asm.accept(chunk(2, 102))
    same = asm.accept(chunk(0, 100))
    assert same.duplicate and same.rejected is None
    delivered = asm.accept(chunk(0, 999))
    assert delivered.duplicate and delivered.rejected is not None
    assert delivered.rejected.error_type is ValidationError.DUPLICATE
    assert delivered.rejected.suggested_action is RecoveryAction.RESTART_PIPELINE
    assert "position 0" in delivered.rejected.detail and "100" in delivered.rejected.detail
    assert "999" in delivered.rejected.detail and "delivered" in delivered.rejected.detail
    buffered = asm.accept(chunk(2, 777))
    assert buffered.rejected is not None and "buffered" in buffered.rejected.detail
    asm.accept(chunk(1, 101))
    assert asm.token_ids == (100, 101, 102)  # the first arrival wins
    stats = asm.statistics()
    assert (stats.duplicates, stats.conflicts, stats.rejected) == (1, 2, {ValidationError.DUPLICATE: 2})


def test_window_bounds_the_reorder_buffer(tok: Tokenizer) -> None:
    asm = assembler(tok, window=4)
    asm.accept(chunk(0, 10))
    far = asm.accept(chunk(6, 16))  # next is 1: the window is [1, 5)
    assert far.rejected is not None and far.rejected.error_type is ValidationError.OUT_OF_ORDER
    assert "window of 4" in far.rejected.detail
    assert far.missing == (1, 2, 3, 4)
    assert asm.statistics().buffered == 0
    # a flood from far ahead never grows memory: only 3 and 4 fit in the window
    for p in range(3, 500):
        asm.accept(chunk(p, 10 + p % 50))
    stats = asm.statistics()
    assert (stats.buffered, stats.max_buffered) == (2, 2)
    assert stats.rejected[ValidationError.OUT_OF_ORDER] == 1 + 495
    assert asm.missing_positions() == (1, 2)
    # as the stream advances, the rejected positions come into the window and are asked for again
    assert asm.accept(chunk(1, 11)).missing == (5,)  # the window is now [2, 6)
    step = asm.accept(chunk(2, 12))
    assert len(step.deltas) >= 1 and asm.token_ids == (10, 11, 12, 13, 14)
    assert step.missing == (6, 7, 8)  # 6 was rejected earlier: asked for again now
    assert asm.missing_positions() == (5, 6, 7, 8)


def test_stale_plan_epoch_is_rejected(tok: Tokenizer) -> None:
    asm = assembler(tok, plan_epoch=2)
    stale = asm.accept(chunk(0, 10, epoch=1))
    assert stale.rejected is not None and stale.rejected.error_type is ValidationError.BAD_FIELD
    assert "stale plan epoch" in stale.rejected.detail
    assert stale.missing == (0,) and asm.token_ids == ()
    newer = asm.accept(chunk(0, 10, epoch=3))
    assert newer.rejected is not None and newer.rejected.suggested_action is RecoveryAction.RESTART_PIPELINE
    assert asm.accept(chunk(0, 10, epoch=2)).rejected is None and list(asm.token_ids) == [10]


def test_misrouted_and_out_of_range_chunks(tok: Tokenizer) -> None:
    asm = assembler(tok, max_tokens=5)
    other = asm.accept(chunk(0, 10, request="someone-else"))
    assert other.rejected is not None and other.missing == ()
    beyond = asm.accept(chunk(5, 10))
    assert beyond.rejected is not None and "max_tokens" in beyond.rejected.detail and beyond.missing == ()
    vocab = asm.accept(chunk(0, tok.vocab_size))
    assert vocab.rejected is not None and "vocabulary" in vocab.rejected.detail and vocab.missing == (0,)
    assert asm.token_ids == ()
    assert asm.statistics().rejected == {ValidationError.BAD_FIELD: 3}


# ---------------------------------------------------------------------------------------------- finishing


def test_stop_string_through_the_assembler(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four five")
    asm = assembler(tok, stop=["three"])
    deltas, _ = feed(asm, list(reversed(chunks(ids))))
    assert asm.finished and asm.finish_reason == "stop"
    assert asm.text == "one two " == "".join(d.text for d in deltas)
    assert [d.finish_reason for d in deltas].count("stop") == 1
    assert asm.statistics().buffered == 0


def test_eos_finishes_and_frees_the_buffer(tok: Tokenizer) -> None:
    eos = min(tok.eos_ids)
    ids = [*tok.encode("Hello there"), eos, *tok.encode(" never shown")]
    asm = StreamAssembler(REQ, tok, max_tokens=100)
    eos_at = ids.index(eos)
    items = chunks(ids)
    feed(asm, items[1:])  # everything but position 0: buffered
    assert asm.statistics().buffered == len(ids) - 1
    step = asm.accept(items[0])
    assert asm.finish_reason == "stop" and asm.text == "Hello there"
    assert step.deltas[-1].finish_reason == "stop"
    assert asm.token_ids == tuple(ids[: eos_at + 1])
    stats = asm.statistics()
    assert stats.buffered == 0 and asm.missing_positions() == ()
    # after the finish, everything is ignored
    late = asm.accept(items[-1])
    assert late == AssemblyStep()
    assert asm.statistics().ignored_after_finish == 1


def test_max_tokens_through_the_assembler(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four five six")
    asm = assembler(tok, max_tokens=3)
    deltas, _ = feed(asm, chunks(ids[:3]))
    assert asm.finish_reason == "length" and asm.text == tok.decode(ids[:3])
    assert deltas[-1].finish_reason == "length"
    with pytest.raises(RuntimeError):
        asm.finish_length()


def test_chunk_finish_reason_is_ignored(tok: Tokenizer) -> None:
    asm = assembler(tok)
    step = asm.accept(chunk(0, tok.encode("Hi")[0], finish="stop"))
    assert not asm.finished and all(d.finish_reason is None for d in step.deltas)


def test_finish_length_flushes_held_text(tok: Tokenizer) -> None:
    ids = tok.encode("ab 世")
    asm = assembler(tok, stop=["世界"])
    deltas, _ = feed(asm, chunks(ids))
    assert "世" not in "".join(d.text for d in deltas)  # held: it may start the stop string
    last = asm.finish_length()
    assert last.finish_reason == "length" and last.text.endswith("世")
    assert asm.text == "ab 世"
    assert asm.accept(chunk(len(ids), 10)) == AssemblyStep()


def test_window_must_be_positive(tok: Tokenizer) -> None:
    with pytest.raises(ValueError):
        StreamAssembler(REQ, tok, max_tokens=5, window=0)
