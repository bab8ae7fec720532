"""TokenValidator, SequenceIntegrityChecker and EncodingValidator (pure)."""

from __future__ import annotations

import codecs
import itertools
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.pipeline.validators import (
    EncodingValidator,
    SequenceIntegrityChecker,
    TokenValidator,
    bad_characters,
)
from exo_stable.wire.messages import (
    CorruptionSeverity,
    CorruptionType,
    RecoveryAction,
    TokenChunk,
    ValidationError,
)
from exo_stable.wire.validation import TokenTransferValidator

SEAL = TokenTransferValidator().seal


def chunk(pos: int, token: int = 7, *, request: str = "r1", rank: int = 1, epoch: int = 2) -> TokenChunk:
    return SEAL(
        TokenChunk(request_id=request, sequence_position=pos, token_id=token, source_device_rank=rank, plan_epoch=epoch)
    )


V = TokenValidator(100, request_id="r1", plan_epoch=2)

# ---------------------------------------------------------------------------------------------- tokens


def test_valid_token() -> None:
    result = V.validate_token(chunk(0))
    assert result.is_valid and result.error_type is None and result.suggested_action is RecoveryAction.NONE


@pytest.mark.parametrize(
    ("bad", "error", "action", "words"),
    [
        (msgspec.structs.replace(chunk(3), token_id=8), ValidationError.CHECKSUM_MISMATCH, RecoveryAction.REGENERATE,
         "checksum"),
        (msgspec.structs.replace(chunk(3), checksum=""), ValidationError.CHECKSUM_MISMATCH, RecoveryAction.REGENERATE,
         "checksum"),
        (msgspec.structs.replace(chunk(3), sequence_position=4), ValidationError.CHECKSUM_MISMATCH,
         RecoveryAction.REGENERATE, "checksum"),
        (chunk(3, request="other"), ValidationError.BAD_FIELD, RecoveryAction.NONE, "'other' reached request 'r1'"),
        (chunk(3, epoch=1), ValidationError.BAD_FIELD, RecoveryAction.REGENERATE, "stale plan epoch 1"),
        (chunk(3, epoch=3), ValidationError.BAD_FIELD, RecoveryAction.RESTART_PIPELINE, "newer"),
        (chunk(3, token=100), ValidationError.BAD_FIELD, RecoveryAction.REGENERATE, "outside the vocabulary"),
        (chunk(-1), ValidationError.BAD_FIELD, RecoveryAction.NONE, "negative sequence position"),
        (chunk(3, token=-5), ValidationError.BAD_FIELD, RecoveryAction.REGENERATE, "negative token id"),
        (chunk(3, rank=-1), ValidationError.BAD_FIELD, RecoveryAction.REGENERATE, "negative source rank"),
        (chunk(3, epoch=-1), ValidationError.BAD_FIELD, RecoveryAction.REGENERATE, "negative plan epoch"),
    ],
)  # fmt: skip
def test_invalid_tokens(bad: TokenChunk, error: ValidationError, action: RecoveryAction, words: str) -> None:
    result = V.validate_token(bad)
    assert not result.is_valid
    assert (result.error_type, result.suggested_action) == (error, action)
    assert words in result.detail


def test_any_epoch_when_none_given() -> None:
    v = TokenValidator(100, request_id="r1")
    assert v.validate_token(chunk(0, epoch=0)).is_valid and v.validate_token(chunk(0, epoch=9)).is_valid


def test_vocab_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenValidator(0, request_id="r")


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10**6),
    st.integers(0, 99),
    st.integers(0, 62),
    st.sampled_from(["request_id", "sequence_position", "token_id", "source_device_rank", "plan_epoch"]),
)
def test_any_single_field_change_is_caught(pos: int, token: int, bit: int, field: str) -> None:
    good = chunk(pos, token)
    value = getattr(good, field)
    altered = value + "x" if isinstance(value, str) else value ^ (1 << bit)
    assert not V.validate_token(msgspec.structs.replace(good, **{field: altered})).is_valid


# ---------------------------------------------------------------------------------------------- sequences


def test_validate_sequence_in_order() -> None:
    result = V.validate_sequence([chunk(i) for i in range(5)])
    assert result.is_valid and result.first_bad_position is None
    assert (result.missing, result.duplicates, result.invalid, result.out_of_order) == ((), (), (), 0)


def test_validate_sequence_finds_every_problem() -> None:
    corrupted = msgspec.structs.replace(chunk(5), token_id=9)
    seq = [chunk(0), chunk(2), chunk(1), chunk(2), chunk(4), corrupted]
    result = V.validate_sequence(seq)
    assert not result.is_valid
    assert result.missing == (3,)
    assert result.duplicates == (2,)
    assert result.invalid == (5,)
    assert result.out_of_order == 1
    assert result.first_bad_position == 2


def test_validate_sequence_out_of_order_alone_is_invalid() -> None:
    result = V.validate_sequence([chunk(1), chunk(0)])
    assert not result.is_valid and result.out_of_order == 1 and result.first_bad_position is None


def test_validate_sequence_start() -> None:
    assert V.validate_sequence([chunk(3), chunk(4)], start=3).is_valid
    result = V.validate_sequence([chunk(3), chunk(4)])
    assert result.missing == (0, 1, 2) and result.first_bad_position == 0
    below = V.validate_sequence([chunk(1), chunk(3)], start=2)
    assert not below.is_valid and below.invalid == (1,)


def test_validate_empty_sequence() -> None:
    assert V.validate_sequence([]).is_valid


# ---------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize(
    ("text", "span", "severity"),
    [
        ("clean text, with\ttab\nnewline\r\n and 世界 😀", None, None),
        ("", None, None),
        ("hello \ufffd world", (6, 7), CorruptionSeverity.MEDIUM),
        ("ab\ud800cd efgh ijkl", (2, 3), CorruptionSeverity.HIGH),
        ("bell\x07 and esc\x1b here", (4, 14), CorruptionSeverity.LOW),
        ("c1 \x85 control and more text", (3, 4), CorruptionSeverity.LOW),
        ("\ufffd\ufffdab", (0, 2), CorruptionSeverity.CRITICAL),
        ("x\x00\x00\x00", (1, 4), CorruptionSeverity.CRITICAL),
    ],
)
def test_detect_corruption(text: str, span: tuple[int, int] | None, severity: CorruptionSeverity | None) -> None:
    report = V.detect_corruption(text)
    if span is None:
        assert report is None
        return
    assert report is not None
    assert report.corruption_type is CorruptionType.ENCODING
    assert report.affected_range == span
    assert report.severity is severity
    assert report.recovery_possible is (severity is not CorruptionSeverity.CRITICAL)
    assert "U+" in report.detail


@given(st.text())
def test_bad_characters_matches_definition(text: str) -> None:
    allowed = {"\t", "\n", "\r"}
    expected = [
        i
        for i, ch in enumerate(text)
        if ch == "\ufffd"
        or 0xD800 <= ord(ch) <= 0xDFFF
        or (ch not in allowed and (ord(ch) < 32 or 0x80 <= ord(ch) < 0xA0))
    ]
    assert bad_characters(text) == expected


# ---------------------------------------------------------------------------------------------- I2 checker


def test_checker_observe() -> None:
    c = SequenceIntegrityChecker()
    assert c.highest_seen is None and c.missing() == ()
    assert c.observe(0) == "next"
    assert c.observe(2) == "ahead"
    assert c.observe(2) == "duplicate"
    assert c.observe(0) == "duplicate"
    assert c.observe(4) == "ahead"
    assert c.next_position == 1 and c.pending == (2, 4) and c.highest_seen == 4
    assert c.missing() == (1, 3)
    assert c.missing(upto=7) == (1, 3, 5, 6)
    assert c.observe(1) == "next"
    assert c.next_position == 3 and list(c.pending) == [4]
    assert c.seen(2) and not c.seen(3) and c.seen(4)
    assert c.observe(3) == "next"
    assert c.next_position == 5 and not c.pending and not c.missing()


def test_checker_start_and_clear() -> None:
    c = SequenceIntegrityChecker(start=10)
    assert c.observe(9) == "duplicate"
    assert c.observe(12) == "ahead"
    c.clear()
    assert c.pending == () and c.next_position == 10
    with pytest.raises(ValueError):
        SequenceIntegrityChecker(start=-1)


@pytest.mark.parametrize(
    ("positions", "ok"),
    [([], True), ([0, 1, 2], True), ([1, 2], False), ([0, 2], False), ([0, 0, 1], False), ([1, 0], False)],
)
def test_verify_token_ordering(positions: list[int], ok: bool) -> None:
    assert SequenceIntegrityChecker().verify_token_ordering(positions) is ok


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.lists(st.integers(0, 80), max_size=40), st.randoms(use_true_random=False))
def test_checker_exactly_once_under_any_arrival_order(n: int, extra: list[int], rnd: random.Random) -> None:
    arrivals = [*range(n), *(e for e in extra if e < n)]
    rnd.shuffle(arrivals)
    c = SequenceIntegrityChecker()
    delivered: list[int] = []
    for p in arrivals:
        before, pending = c.next_position, c.pending
        expected = "duplicate" if p < before or p in pending else ("next" if p == before else "ahead")
        assert c.observe(p) == expected
        delivered.extend(range(before, c.next_position))
    assert c.verify_token_ordering(delivered)
    assert c.next_position == n and c.pending == () and c.missing() == ()


# ---------------------------------------------------------------------------------------------- encoding

E = EncodingValidator()


@pytest.mark.parametrize(
    ("text", "ok"),
    [("hello", True), ("tab\tnew\nline\r", True), ("世界😀", True), ("", True), ("a\ufffd", False),
     ("\udc80", False), ("nul\x00", False), ("del\x7f is fine", True), ("\x9b", False)],
)  # fmt: skip
def test_validate_delta(text: str, ok: bool) -> None:
    result = E.validate_delta(text)
    assert result.is_valid is ok
    if not ok:
        assert result.error_type is ValidationError.BAD_ENCODING
        assert result.suggested_action is RecoveryAction.REGENERATE


def test_validate_delta_confidence() -> None:
    assert E.validate_delta("\ufffd").confidence_score < E.validate_delta("\x00").confidence_score
    assert E.validate_delta("\ud800").confidence_score == 1.0


@pytest.mark.parametrize(
    ("data", "ok", "offset"),
    [
        (b"plain", True, None),
        ("世界😀".encode(), True, None),
        (b"", True, None),
        (b"\xc0\xaf", False, 0),  # overlong '/'
        (b"ab\xe0\x80\xaf", False, 2),  # overlong 3-byte
        (b"\xf0\x80\x80\xaf", False, 0),  # overlong 4-byte
        (b"x\xed\xa0\x80", False, 1),  # encoded surrogate U+D800
        (b"\xf4\x90\x80\x80", False, 0),  # above U+10FFFF
        (b"ok\xe4\xb8", False, 2),  # truncated
        (b"\x80", False, 0),  # lone continuation byte
        (b"\xff", False, 0),
    ],
)
def test_validate_utf8(data: bytes, ok: bool, offset: int | None) -> None:
    result = E.validate_utf8(data)
    assert result.is_valid is ok
    if not ok:
        assert result.error_type is ValidationError.BAD_ENCODING
        assert f"at byte {offset}" in result.detail


@given(st.binary(max_size=64))
def test_validate_utf8_agrees_with_strict_decoding(data: bytes) -> None:
    try:
        data.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert E.validate_utf8(data).is_valid is valid


def _incremental(data: bytes, cuts: list[int]) -> list[str]:
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    bounds = sorted({0, *(c % (len(data) + 1) for c in cuts), len(data)})
    out = [dec.decode(data[a:b]) for a, b in itertools.pairwise(bounds)]
    return [*out, dec.decode(b"", final=True)]


@settings(max_examples=200, deadline=None)
@given(st.text(), st.lists(st.integers(0, 10**4), max_size=10))
def test_check_stream_accepts_a_correct_incremental_decode(text: str, cuts: list[int]) -> None:
    data = text.encode("utf-8", errors="surrogatepass")
    full = data.decode("utf-8", errors="replace")
    assert E.check_stream(_incremental(data, cuts), full).is_valid


def test_check_stream_catches_a_split_character() -> None:
    data = "a世b".encode()
    broken = [data[:2].decode("utf-8", "replace"), data[2:].decode("utf-8", "replace")]
    result = E.check_stream(broken, "a世b")
    assert not result.is_valid
    assert result.error_type is ValidationError.BAD_ENCODING
    assert "U+FFFD" in result.detail and "'世'" in result.detail


def test_check_stream_allows_a_replacement_the_full_decode_has() -> None:
    full = b"a\xffb".decode("utf-8", "replace")
    assert E.check_stream(["a", "\ufffd", "b"], full).is_valid


@pytest.mark.parametrize(
    ("deltas", "full", "at"),
    [(["ab", "c"], "abd", 2), (["ab"], "abc", 2), (["abc", "d"], "abc", 3), (["b"], "a", 0)],
)
def test_check_stream_catches_a_mismatch(deltas: list[str], full: str, at: int) -> None:
    result = E.check_stream(deltas, full)
    assert not result.is_valid and f"at character {at}" in result.detail
