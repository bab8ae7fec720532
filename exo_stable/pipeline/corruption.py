"""The design's ``CorruptionDetector``: finds signs of corruption in generated text, bytes and token streams.

Pure logic (no IO, no asyncio, no MLX). What it flags, each as a :class:`Finding` with a kind, the affected
range, a severity and whether recovery is possible:

- ``replacement_char``: U+FFFD in text (bytes that were not valid UTF-8 somewhere upstream).
- ``invalid_utf8``: bytes that are not UTF-8 (stray continuation bytes, truncated sequences, encoded
  surrogates, code points above U+10FFFF, bytes F5..FF); in text, lone surrogates.
- ``overlong_utf8``: overlong encodings such as ``b"\\xc0\\xaf"`` (a classic filter-evasion trick; no
  correct encoder produces them).
- ``control_char``: C0 controls other than tab, newline and carriage return, DEL, C1 controls, a BOM after
  the start, noncharacters and deprecated format characters. Legitimate format characters (ZWJ, ZWNJ, the
  bidi marks and isolates, soft hyphen, emoji tag sequences) are not flagged.
- ``mojibake``: UTF-8 text that was decoded as Latin-1 or cp1252 ("cafÃ©", "â€™", "ðŸ˜€"). Found by
  re-encoding runs of Latin-1/cp1252 characters to bytes and decoding them as UTF-8; the re-decoded text is
  given in the detail, so this kind is always recoverable.
- ``out_of_vocabulary``: token ids outside the tokenizer's vocabulary.
- ``degenerate_repetition``: a unit of 1..40 characters (or tokens) repeated back to back until the end of the
  output: the model is stuck in a loop.
- ``sequence_disorder`` (beyond the issue's list, because :meth:`CorruptionDetector.detect_encoding_issues`
  also checks positions): token positions duplicated or out of order.

The wire's :class:`CorruptionType` is coarser; :meth:`Finding.report` maps each kind to the closest type and
names the finer kind at the start of the report's ``detail``.
"""

from __future__ import annotations

import codecs
import contextlib
import enum
import unicodedata
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from exo_stable.pipeline.validators import bad_characters
from exo_stable.wire.messages import CorruptionReport, CorruptionSeverity, CorruptionType, TokenChunk

if TYPE_CHECKING:
    from exo_stable.tokenizer import Tokenizer

__all__ = [
    "CorruptionAnalysis",
    "CorruptionDetector",
    "CorruptionKind",
    "EncodingIssues",
    "Finding",
    "RepetitionRun",
    "find_repetition",
]


class CorruptionKind(enum.StrEnum):
    """The detector's fine-grained kinds of corruption (see the module docstring)."""

    REPLACEMENT_CHAR = "replacement_char"
    INVALID_UTF8 = "invalid_utf8"
    OVERLONG_UTF8 = "overlong_utf8"
    CONTROL_CHAR = "control_char"
    MOJIBAKE = "mojibake"
    OUT_OF_VOCABULARY = "out_of_vocabulary"
    DEGENERATE_REPETITION = "degenerate_repetition"
    SEQUENCE_DISORDER = "sequence_disorder"


CORRUPTION_TYPE: Final[dict[CorruptionKind, CorruptionType]] = {
    CorruptionKind.REPLACEMENT_CHAR: CorruptionType.ENCODING,
    CorruptionKind.INVALID_UTF8: CorruptionType.ENCODING,
    CorruptionKind.OVERLONG_UTF8: CorruptionType.ENCODING,
    CorruptionKind.CONTROL_CHAR: CorruptionType.ENCODING,
    CorruptionKind.MOJIBAKE: CorruptionType.ENCODING,
    # An id that no token has cannot be turned into text: an encoding failure of the token stream.
    CorruptionKind.OUT_OF_VOCABULARY: CorruptionType.ENCODING,
    # A loop is a defect of the generated sequence, not of any one token's encoding.
    CorruptionKind.DEGENERATE_REPETITION: CorruptionType.SEQUENCE,
    CorruptionKind.SEQUENCE_DISORDER: CorruptionType.SEQUENCE,
}
"""The wire's coarse :class:`CorruptionType` for each :class:`CorruptionKind`."""

_BASE_SEVERITY: Final[dict[CorruptionKind, CorruptionSeverity]] = {
    CorruptionKind.REPLACEMENT_CHAR: CorruptionSeverity.MEDIUM,
    CorruptionKind.INVALID_UTF8: CorruptionSeverity.MEDIUM,
    CorruptionKind.OVERLONG_UTF8: CorruptionSeverity.HIGH,
    CorruptionKind.CONTROL_CHAR: CorruptionSeverity.LOW,
    CorruptionKind.MOJIBAKE: CorruptionSeverity.MEDIUM,
    CorruptionKind.OUT_OF_VOCABULARY: CorruptionSeverity.HIGH,
    CorruptionKind.DEGENERATE_REPETITION: CorruptionSeverity.LOW,
    CorruptionKind.SEQUENCE_DISORDER: CorruptionSeverity.HIGH,
}

_ALWAYS_RECOVERABLE: Final[frozenset[CorruptionKind]] = frozenset(
    {CorruptionKind.MOJIBAKE, CorruptionKind.DEGENERATE_REPETITION}
)

_SEVERITY_RANK: Final[dict[CorruptionSeverity, int]] = {
    CorruptionSeverity.LOW: 0,
    CorruptionSeverity.MEDIUM: 1,
    CorruptionSeverity.HIGH: 2,
    CorruptionSeverity.CRITICAL: 3,
}

Unit = Literal["char", "byte", "position", "index"]
"""What a finding's range counts: characters of text, bytes, token sequence positions, or list indices."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One stretch of corruption: ``[start, end)`` in ``unit``\\ s of the analysed input."""

    kind: CorruptionKind
    start: int
    end: int
    severity: CorruptionSeverity
    recovery_possible: bool
    detail: str = ""
    unit: Unit = "char"

    def report(self, source_node: str = "") -> CorruptionReport:
        """The wire's :class:`CorruptionReport`; ``detail`` starts with the fine kind (``"mojibake: ..."``)."""
        detail = f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value
        return CorruptionReport(
            corruption_type=CORRUPTION_TYPE[self.kind],
            affected_range=(self.start, self.end),
            severity=self.severity,
            recovery_possible=self.recovery_possible,
            source_node=source_node,
            detail=detail,
        )


def _worst(findings: Sequence[Finding]) -> CorruptionSeverity | None:
    if not findings:
        return None
    return max((f.severity for f in findings), key=_SEVERITY_RANK.__getitem__)


@dataclass(frozen=True, slots=True)
class CorruptionAnalysis:
    """The verdict on one text (or byte string): its findings, ordered by start."""

    findings: tuple[Finding, ...] = ()

    @property
    def clean(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    @property
    def kinds(self) -> frozenset[CorruptionKind]:
        """The kinds found."""
        return frozenset(f.kind for f in self.findings)

    def by_kind(self) -> dict[CorruptionKind, tuple[Finding, ...]]:
        """The findings grouped by kind (only kinds that were found)."""
        out: dict[CorruptionKind, list[Finding]] = {}
        for f in self.findings:
            out.setdefault(f.kind, []).append(f)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def worst_severity(self) -> CorruptionSeverity | None:
        """The highest severity among the findings; None when clean."""
        return _worst(self.findings)

    @property
    def recovery_possible(self) -> bool:
        """Whether every finding is recoverable (True when clean)."""
        return all(f.recovery_possible for f in self.findings)

    def reports(self, source_node: str = "") -> tuple[CorruptionReport, ...]:
        """One wire report per finding."""
        return tuple(f.report(source_node) for f in self.findings)


@dataclass(frozen=True, slots=True)
class EncodingIssues:
    """The verdict on a list of token chunks.

    Ranges of findings are sequence positions (``unit="position"``), except for repetition found by
    :meth:`CorruptionDetector.detect_token_repetition`. ``positions`` lists every position touched by a
    finding. ``text`` is the decode of the in-vocabulary ids in position order ("" without a tokenizer);
    ``incomplete_tail`` says its last character is still incomplete, which is not (yet) corruption.
    """

    findings: tuple[Finding, ...] = ()
    positions: tuple[int, ...] = ()
    out_of_vocabulary: tuple[int, ...] = ()
    duplicates: tuple[int, ...] = ()
    out_of_order: tuple[int, ...] = ()
    text: str = ""
    incomplete_tail: bool = False

    @property
    def clean(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    @property
    def kinds(self) -> frozenset[CorruptionKind]:
        """The kinds found."""
        return frozenset(f.kind for f in self.findings)

    @property
    def worst_severity(self) -> CorruptionSeverity | None:
        """The highest severity among the findings; None when clean."""
        return _worst(self.findings)


# ---------------------------------------------------------------------------------------------------------
# Repetition
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RepetitionRun:
    """``seq[start:end]`` has period ``period``: one unit repeated ``repeats`` times (the last maybe partly)."""

    start: int
    end: int
    period: int

    @property
    def length(self) -> int:
        """Items covered."""
        return self.end - self.start

    @property
    def repeats(self) -> float:
        """How many times the unit occurs (fractional when the run ends inside a unit)."""
        return self.length / self.period


def find_repetition(
    seq: Sequence[Hashable],
    *,
    max_period: int = 40,
    min_repeats: float = 6.0,
    min_length: int = 48,
    tail_share: float = 0.8,
    window: int = 4096,
) -> RepetitionRun | None:
    """The longest periodic run of ``seq`` that looks like a generation loop, or None.

    A run qualifies when its unit (period 1..``max_period``) occurs at least ``min_repeats`` times, it covers
    at least ``min_length`` items, and it makes up at least ``tail_share`` of everything from its start to
    the end (the model is still looping when the output stops). Among qualifying runs the longest wins, and
    the smallest period among equally long ones. Works on strings (characters) and lists of token ids.

    Only the last ``window`` items are scanned (a loop runs to the end); a run that fills the window is then
    followed back to where it really starts, so long loops are measured in full.
    """
    n = len(seq)
    offset = max(0, n - window)
    best: RepetitionRun | None = None
    for p in range(1, min(max_period, (n - offset) // 2) + 1):
        i = offset
        limit = n - p
        while i < limit:
            if seq[i] != seq[i + p]:
                i += 1
                continue
            j = i
            while j < limit and seq[j] == seq[j + p]:
                j += 1
            if i == offset:
                while i > 0 and seq[i - 1] == seq[i - 1 + p]:
                    i -= 1
            run = RepetitionRun(i, j + p, p)
            i = j
            if run.length < min_length or run.repeats < min_repeats or run.length < tail_share * (n - run.start):
                continue
            if best is None or run.length > best.length:
                best = run
    return best


# ---------------------------------------------------------------------------------------------------------
# Characters
# ---------------------------------------------------------------------------------------------------------

_SUSPICIOUS_FORMAT: Final[frozenset[int]] = frozenset(
    [0xFFF9, 0xFFFA, 0xFFFB, 0xE0001, *range(0x206A, 0x2070)]  # interlinear annotation, language tag, deprecated
)
_TAG_RANGE: Final[range] = range(0xE0020, 0xE0080)
_BLACK_FLAG: Final[int] = 0x1F3F4


def _is_noncharacter(cp: int) -> bool:
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def _extra_control(text: str, i: int) -> bool:
    """Format characters and noncharacters that :func:`bad_characters` lets through but that don't belong."""
    cp = ord(text[i])
    if cp < 0xAD:
        return cp == 0x7F  # DEL: the one control character outside C0 and C1
    if cp == 0xFEFF:
        return i > 0  # a BOM is fine only at the very start
    if cp in _SUSPICIOUS_FORMAT or _is_noncharacter(cp):
        return True
    if cp in _TAG_RANGE:  # emoji tag sequences: U+1F3F4 followed by tags (subdivision flags)
        j = i - 1
        while j >= 0 and ord(text[j]) in _TAG_RANGE:
            j -= 1
        return j < 0 or ord(text[j]) != _BLACK_FLAG
    return False


# ---------------------------------------------------------------------------------------------------------
# Mojibake
# ---------------------------------------------------------------------------------------------------------

_WILDCARD: Final[int] = -1
"""A U+FFFD inside a mojibake run: a cp1252-undefined byte (81, 8D, 8F, 90, 9D) lost by ``errors="replace"``."""
_CP1252_UNDEFINED: Final[tuple[int, ...]] = (0x81, 0x8D, 0x8F, 0x90, 0x9D)


def _high_byte_map() -> dict[str, int]:
    out: dict[str, int] = {}
    for b in range(0x80, 0x100):
        out[chr(b)] = b  # Latin-1 (C1 controls for 80..9F)
    for b in range(0x80, 0xA0):
        with contextlib.suppress(UnicodeDecodeError):  # 81, 8D, 8F, 90, 9D are undefined in cp1252
            out[bytes([b]).decode("cp1252")] = b
    return out


_HIGH_BYTE: Final[dict[str, int]] = _high_byte_map()
"""Character -> the byte that Latin-1 or cp1252 decodes to it, for bytes 80..FF."""

_STRONG_CONTINUATION: Final[frozenset[str]] = frozenset("€ƒˆ‰Š†‡ŒŽ˜™šœžŸ\ufffd" + "".join(map(chr, range(0x80, 0xA0))))
"""Continuation characters that never follow a letter in real text (cp1252 letters/symbols, C1, U+FFFD)."""
_STRONG_LEADS: Final[frozenset[str]] = frozenset("ÂÃð")
"""Lead characters of the most common mojibake (U+0080..U+00FF and emoji) that real text pairs with nothing."""
_TYPOGRAPHY: Final[frozenset[str]] = frozenset("…–—‘’“”•‚„‹›«»¡¿\xa0")
"""Continuation characters that naturally follow a word-final capital (ellipsis, dashes, quotes, NBSP)."""
_COMMON_LETTERS: Final[tuple[tuple[int, int], ...]] = (
    (0x0100, 0x017F),  # Latin Extended-A (Central European, Turkish, Baltic)
    (0x0370, 0x03FF),  # Greek
    (0x0400, 0x04FF),  # Cyrillic
    (0x05D0, 0x05EA),  # Hebrew letters
    (0x0621, 0x064A),  # Arabic letters
)
_PLAUSIBLE_WIDE: Final[tuple[tuple[int, int], ...]] = (
    (0x0900, 0x0FFF),  # Indic scripts, Thai, Lao, Tibetan
    (0x1000, 0x10FF),  # Myanmar, Georgian
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x1200, 0x137F),  # Ethiopic
    (0x1780, 0x17FF),  # Khmer
    (0x1E00, 0x1FFF),  # Latin Extended Additional (Vietnamese), Greek Extended
    (0x2000, 0x2BFF),  # punctuation, currency, letterlike, arrows, math, technical, box drawing, symbols
    (0x2E80, 0x9FFF),  # CJK radicals, punctuation, kana, CJK ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # half- and fullwidth forms
    (0xFFFD, 0xFFFD),
    (0x10000, 0x10FFFF),  # emoji and the rest of the supplementary planes (4-byte sequences)
)
"""Where 3- and 4-byte sequences of real text land; other results (Samaritan, ...) are chance byte soup."""


def _plausible(decoded: str) -> bool:
    return (
        len(decoded) == 1
        and unicodedata.category(decoded) != "Cn"
        and any(lo <= ord(decoded) <= hi for lo, hi in _PLAUSIBLE_WIDE)
    )


_FRENCH_SPACED: Final[frozenset[str]] = frozenset("»:;!?%")

# Allowed range of the second byte for each lead byte (RFC 3629); other continuation bytes are 80..BF.
_SECOND_RANGE: Final[dict[int, tuple[int, int]]] = {
    0xE0: (0xA0, 0xBF),
    0xED: (0x80, 0x9F),
    0xF0: (0x90, 0xBF),
    0xF4: (0x80, 0x8F),
}


def _seq_len(lead: int) -> int:
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


@dataclass(frozen=True, slots=True)
class _Hit:
    start: int
    end: int
    decoded: str
    strong: bool


def _match_sequence(codes: Sequence[int], i: int) -> bytes | None:
    """The UTF-8 bytes of a valid sequence starting at ``codes[i]`` (wildcards resolved), or None."""
    lead = codes[i]
    size = _seq_len(lead)
    if size == 0 or i + size > len(codes):
        return None
    out = bytearray([lead])
    for k in range(1, size):
        lo, hi = _SECOND_RANGE.get(lead, (0x80, 0xBF)) if k == 1 else (0x80, 0xBF)
        c = codes[i + k]
        if c == _WILDCARD:
            c = next((b for b in _CP1252_UNDEFINED if lo <= b <= hi), -2)
        if not lo <= c <= hi:
            return None
        out.append(c)
    return bytes(out)


def _mojibake_hits(text: str, opaque: frozenset[int]) -> list[_Hit]:
    """Candidate mojibake sequences: runs of Latin-1/cp1252 characters that re-decode as UTF-8."""
    hits: list[_Hit] = []
    n = len(text)
    i = 0
    while i < n:
        ch = text[i]
        if ch not in _HIGH_BYTE or i in opaque:
            i += 1
            continue
        j = i
        codes: list[int] = []
        while j < n and j not in opaque and (text[j] in _HIGH_BYTE or (text[j] == "\ufffd" and j > i)):
            codes.append(_HIGH_BYTE.get(text[j], _WILDCARD))
            j += 1
        k = 0
        while k < len(codes):
            raw = _match_sequence(codes, k)
            if raw is None:
                k += 1
                continue
            start, end = i + k, i + k + len(raw)
            piece = text[start:end]
            nbsp = piece.find("\xa0")
            french = nbsp >= 0 and (
                (nbsp + 1 < len(piece) and piece[nbsp + 1] in _FRENCH_SPACED)
                or (end < n and nbsp == len(piece) - 1 and text[end] in _FRENCH_SPACED)
                or (nbsp > 0 and piece[nbsp - 1] == "«")
            )
            if not french:
                decoded = "\ufffd" if _WILDCARD in codes[k : k + len(raw)] else raw.decode("utf-8")
                strong = (
                    (len(raw) >= 3 and _plausible(decoded) and not all(c in _TYPOGRAPHY for c in piece[1:]))
                    or decoded == "\ufeff"  # "ï»¿": a UTF-8 byte order mark read as Latin-1
                    or (piece[0] in _STRONG_LEADS and decoded >= "\xa0")  # "Â–" would be a C1 control
                    or any(c in _STRONG_CONTINUATION for c in piece[1:])
                )
                hits.append(_Hit(start, end, decoded, strong))
            k += len(raw)
        i = j
    # Two sequences back to back ("ÐŸÑ€") never happen in real text, unless they are capitals and typography.
    adjacent = [
        ((idx > 0 and hits[idx - 1].end == h.start) or (idx + 1 < len(hits) and hits[idx + 1].start == h.end))
        and not all(c in _TYPOGRAPHY for c in text[h.start + 1 : h.end])
        for idx, h in enumerate(hits)
    ]
    # A pair that decodes to a common letter ("Î±" -> α, "Ä°" -> İ) is weak evidence alone; inside a word, or
    # twice in a text, it is mojibake. A capital followed by typography ("SÉ…", "PÅ…", "CAFÉ”") is not.
    lettered = [
        len(h.decoded) == 1
        and any(lo <= ord(h.decoded) <= hi for lo, hi in _COMMON_LETTERS)
        and text[h.end - 1] not in _TYPOGRAPHY
        for h in hits
    ]
    repeated = sum(lettered) >= 2
    out: list[_Hit] = []
    for idx, h in enumerate(hits):
        in_word = (h.start > 0 and text[h.start - 1].isalpha()) or (h.end < n and text[h.end].isalpha())
        strong = h.strong or adjacent[idx] or (lettered[idx] and (in_word or repeated))
        out.append(_Hit(h.start, h.end, h.decoded, strong))
    return out


# ---------------------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------------------


def _is_cont(data: bytes, i: int) -> bool:
    return i < len(data) and 0x80 <= data[i] <= 0xBF


def _classify_utf8_error(data: bytes, i: int) -> tuple[CorruptionKind, int, str, bool]:
    """What is wrong at ``data[i]``: (kind, length in bytes, description, truncated at the end of data)."""
    b0 = data[i]
    nxt = data[i + 1] if i + 1 < len(data) else -1
    if b0 in (0xC0, 0xC1) and _is_cont(data, i + 1):
        return CorruptionKind.OVERLONG_UTF8, 2, "overlong 2-byte encoding", False
    if b0 == 0xE0 and 0x80 <= nxt <= 0x9F and _is_cont(data, i + 2):
        return CorruptionKind.OVERLONG_UTF8, 3, "overlong 3-byte encoding", False
    if b0 == 0xF0 and 0x80 <= nxt <= 0x8F and _is_cont(data, i + 2) and _is_cont(data, i + 3):
        return CorruptionKind.OVERLONG_UTF8, 4, "overlong 4-byte encoding", False
    if b0 == 0xED and 0xA0 <= nxt <= 0xBF and _is_cont(data, i + 2):
        return CorruptionKind.INVALID_UTF8, 3, "encoded surrogate", False
    if b0 == 0xF4 and 0x90 <= nxt <= 0xBF and _is_cont(data, i + 2) and _is_cont(data, i + 3):
        return CorruptionKind.INVALID_UTF8, 4, "code point above U+10FFFF", False
    if 0x80 <= b0 <= 0xBF:
        j = i
        while _is_cont(data, j):
            j += 1
        return CorruptionKind.INVALID_UTF8, j - i, "unexpected continuation byte(s)", False
    size = _seq_len(b0)
    if size == 0:  # C0, C1 alone, F5..FF
        j = i + 1
        while j < len(data) and j - i < 4 and _is_cont(data, j):
            j += 1
        return CorruptionKind.INVALID_UTF8, j - i, f"invalid byte 0x{b0:02X}", False
    j = i + 1
    while j < i + size and _is_cont(data, j):
        j += 1
    # A valid lead with too few continuation bytes (wrong second byte for E0/ED/F0/F4 counts as too few).
    lo, hi = _SECOND_RANGE.get(b0, (0x80, 0xBF))
    if j > i + 1 and not lo <= data[i + 1] <= hi:
        j = i + 1
    return CorruptionKind.INVALID_UTF8, j - i, "truncated sequence", j == len(data)


# ---------------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Raw:
    kind: CorruptionKind
    start: int
    end: int
    detail: str
    units: int = field(default=0)


class CorruptionDetector:
    """Finds corruption in model output: text, raw bytes and token chunks.

    ``vocab_size`` (or ``tokenizer.vocab_size``) enables the out-of-vocabulary check; ``tokenizer`` also lets
    :meth:`detect_encoding_issues` decode the ids. Thresholds:

    - ``repetition_*``: see :func:`find_repetition`. Units that are layout (whitespace and one punctuation or
      symbol character: ``"-----"``, ``". . ."``, indentation; or table grid: ``"|---"``, ``"─┼"``) need
      ``filler_min_length``.
    - ``high_share`` / ``critical_share``: a kind affecting at least this share of the input (and at least
      ``escalate_min_units`` units) is at least HIGH / is CRITICAL. A CRITICAL finding is not recoverable
      (the whole output is garbage: restart rather than regenerate a few tokens). Mojibake stops at HIGH
      and is always recoverable (re-decode it); repetition is LOW below ``critical_share`` of the input,
      then MEDIUM, HIGH, and CRITICAL from three times ``critical_share``, and always recoverable (cut the
      loop, regenerate with a repetition penalty). Out-of-vocabulary ids are HIGH, recoverable.
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        tokenizer: Tokenizer | None = None,
        *,
        repetition_max_period: int = 40,
        repetition_min_repeats: float = 6.0,
        repetition_min_length: int = 48,
        repetition_tail_share: float = 0.8,
        repetition_window: int = 4096,
        filler_min_length: int = 256,
        token_repetition_min_length: int = 24,
        high_share: float = 0.10,
        critical_share: float = 0.25,
        escalate_min_units: int = 3,
    ) -> None:
        """See the class docstring."""
        if vocab_size is None and tokenizer is not None:
            vocab_size = tokenizer.vocab_size
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if tokenizer is not None and vocab_size is not None and vocab_size > tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} exceeds the tokenizer's {tokenizer.vocab_size}")
        if not 0 < high_share <= critical_share:
            raise ValueError("need 0 < high_share <= critical_share")
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.repetition_max_period = repetition_max_period
        self.repetition_min_repeats = repetition_min_repeats
        self.repetition_min_length = repetition_min_length
        self.repetition_tail_share = repetition_tail_share
        self.repetition_window = repetition_window
        self.filler_min_length = filler_min_length
        self.token_repetition_min_length = token_repetition_min_length
        self.high_share = high_share
        self.critical_share = critical_share
        self.escalate_min_units = escalate_min_units

    # ------------------------------------------------------------------------------------------ severity

    def _finish(self, raws: Sequence[_Raw], total: int, unit: Unit) -> tuple[Finding, ...]:
        """Severity and recoverability per kind, from the share of the input that kind affects."""
        affected: dict[CorruptionKind, int] = {}
        for r in raws:
            affected[r.kind] = affected.get(r.kind, 0) + (r.units or r.end - r.start)
        out: list[Finding] = []
        for r in raws:
            units = affected[r.kind]
            share = units / total if total else 1.0
            if r.kind is CorruptionKind.DEGENERATE_REPETITION:
                steps = (CorruptionSeverity.LOW, CorruptionSeverity.MEDIUM, CorruptionSeverity.HIGH)
                severity = steps[min(2, int(share / self.critical_share))]
                if share >= 3 * self.critical_share:
                    severity = CorruptionSeverity.CRITICAL
            else:
                severity = _BASE_SEVERITY[r.kind]
                if units >= self.escalate_min_units:
                    if share >= self.critical_share:
                        severity = CorruptionSeverity.CRITICAL
                    elif share >= self.high_share and _SEVERITY_RANK[severity] < 2:
                        severity = CorruptionSeverity.HIGH
            if r.kind is CorruptionKind.MOJIBAKE and severity is CorruptionSeverity.CRITICAL:
                severity = CorruptionSeverity.HIGH  # garbled only in appearance: re-decoding restores it
            # Mojibake is re-decoded; a loop is cut where it starts and the rest regenerated.
            recoverable = r.kind in _ALWAYS_RECOVERABLE or severity is not CorruptionSeverity.CRITICAL
            out.append(Finding(r.kind, r.start, r.end, severity, recoverable, r.detail, unit))
        out.sort(key=lambda f: (f.start, f.end, f.kind.value))
        return tuple(out)

    # ------------------------------------------------------------------------------------------ text

    def _text_raws(self, text: str, opaque: frozenset[int] = frozenset()) -> list[_Raw]:
        raws: list[_Raw] = []
        covered: set[int] = set(opaque)
        hits = _mojibake_hits(text, frozenset(opaque))
        if any(h.strong for h in hits):
            for h in _merge_hits(hits):
                raws.append(h)
                covered.update(range(h.start, h.end))
        bad = set(bad_characters(text))
        bad.update(i for i, ch in enumerate(text) if (ord(ch) >= 0xAD or ch == "\x7f") and _extra_control(text, i))
        run: _Raw | None = None
        for i in sorted(bad - covered):
            cp = ord(text[i])
            if cp == 0xFFFD:
                kind, desc = CorruptionKind.REPLACEMENT_CHAR, "U+FFFD"
            elif 0xD800 <= cp <= 0xDFFF:
                kind, desc = CorruptionKind.INVALID_UTF8, f"lone surrogate U+{cp:04X}"
            else:
                name = unicodedata.name(text[i], "")
                kind = CorruptionKind.CONTROL_CHAR
                desc = f"U+{cp:04X} ({name or unicodedata.category(text[i])})"
            if run is not None and run.kind is kind and run.end == i:
                run = _Raw(kind, run.start, i + 1, f"{run.detail}, {desc}" if len(run.detail) < 120 else run.detail)
                continue
            if run is not None:
                raws.append(run)
            run = _Raw(kind, i, i + 1, desc)
        if run is not None:
            raws.append(run)
        rep = self._text_repetition(text)
        if rep is not None:
            raws.append(rep)
        return raws

    def _text_repetition(self, text: str) -> _Raw | None:
        run = find_repetition(
            text,
            max_period=self.repetition_max_period,
            min_repeats=self.repetition_min_repeats,
            min_length=self.repetition_min_length,
            tail_share=self.repetition_tail_share,
            window=self.repetition_window,
        )
        if run is None:
            return None
        unit = text[run.start : run.start + run.period]
        if _is_filler_unit(unit) and run.length < self.filler_min_length:
            return None
        return _Raw(
            CorruptionKind.DEGENERATE_REPETITION,
            run.start,
            run.end,
            f"{unit!r} repeated {run.repeats:.1f} times ({run.length} of {len(text)} characters)",
        )

    def analyze_output(self, text: str) -> CorruptionAnalysis:
        """Check generated text; ranges are character indices ``[start, end)``."""
        return CorruptionAnalysis(self._finish(self._text_raws(text), len(text), "char"))

    def analyze_bytes(self, data: bytes, *, final: bool = True) -> CorruptionAnalysis:
        """Check raw output bytes as strict UTF-8, then the decoded text; ranges are byte offsets.

        With ``final`` false the data is a prefix of a stream: an incomplete sequence at its very end is not
        reported (the rest may follow). With ``final`` true it is ``invalid_utf8`` (truncated output), LOW.
        """
        raws: list[_Raw] = []
        chars: list[str] = []
        offsets: list[int] = []  # byte offset of each character of the decoded text
        opaque: set[int] = set()
        pos = 0
        n = len(data)
        while pos < n:
            try:
                part = data[pos:].decode("utf-8")
                end = n
            except UnicodeDecodeError as exc:
                end = pos + exc.start
                part = data[pos:end].decode("utf-8")
            at = pos
            for ch in part:
                chars.append(ch)
                offsets.append(at)
                at += len(ch.encode("utf-8"))
            if end >= n:
                break
            kind, length, desc, at_end = _classify_utf8_error(data, end)
            if at_end and not final:
                break
            bad = data[end : end + length]
            raws.append(_Raw(kind, end, end + length, f"{desc} {bad!r} at byte {end}"))
            opaque.add(len(chars))
            chars.append("\ufffd")
            offsets.append(end)
            pos = end + length
        offsets.append(pos if pos < n and not final else n)
        text = "".join(chars)
        merged: list[_Raw] = []
        for r in raws:  # adjacent stray bytes of one kind are one finding
            if merged and merged[-1].kind is r.kind and merged[-1].end == r.start:
                prev = merged.pop()
                merged.append(_Raw(r.kind, prev.start, r.end, prev.detail + "; " + r.detail))
            else:
                merged.append(r)
        for t in self._text_raws(text, frozenset(opaque)):
            start, end = offsets[t.start], offsets[t.end]
            merged.append(_Raw(t.kind, start, end, t.detail))
        findings = list(self._finish(merged, n, "byte"))
        for i, f in enumerate(findings):
            if (
                f.kind is CorruptionKind.INVALID_UTF8
                and f.end == n
                and "truncated sequence" in f.detail
                and f.end - f.start < 4
            ):
                findings[i] = Finding(f.kind, f.start, f.end, CorruptionSeverity.LOW, True, f.detail, "byte")
        return CorruptionAnalysis(tuple(findings))

    # ------------------------------------------------------------------------------------------ tokens

    def detect_encoding_issues(self, tokens: Sequence[TokenChunk]) -> EncodingIssues:
        """Check one stream's chunks: token ids against the vocabulary, the decode for U+FFFD, the positions.

        Chunks are decoded in position order (the first chunk of a duplicated position wins). A U+FFFD in the
        decode is corruption (``replacement_char``, its range the positions whose bytes produced it) unless it
        stands for an incomplete character at the very end. Needs ``vocab_size`` for the vocabulary check
        and a tokenizer for the decode; positions are always checked.
        """
        raws: list[_Raw] = []
        seen: dict[int, TokenChunk] = {}
        duplicates: set[int] = set()
        out_of_order: list[int] = []
        previous: int | None = None
        for chunk in tokens:
            pos = chunk.sequence_position
            if pos in seen:
                duplicates.add(pos)
                if seen[pos].token_id != chunk.token_id:
                    raws.append(
                        _Raw(
                            CorruptionKind.SEQUENCE_DISORDER,
                            pos,
                            pos + 1,
                            f"position {pos} arrived twice with different tokens "
                            f"({seen[pos].token_id} and {chunk.token_id})",
                        )
                    )
                else:
                    raws.append(_Raw(CorruptionKind.SEQUENCE_DISORDER, pos, pos + 1, f"position {pos} duplicated"))
            else:
                seen[pos] = chunk
            if previous is not None and pos < previous:
                out_of_order.append(pos)
                if pos not in duplicates:
                    raws.append(
                        _Raw(CorruptionKind.SEQUENCE_DISORDER, pos, pos + 1, f"position {pos} after {previous}")
                    )
            previous = pos
        ordered = [seen[p] for p in sorted(seen)]
        oov: list[int] = []
        if self.vocab_size is not None:
            for chunk in ordered:
                tid = chunk.token_id
                if not 0 <= tid < self.vocab_size:
                    oov.append(chunk.sequence_position)
                    raws.append(
                        _Raw(
                            CorruptionKind.OUT_OF_VOCABULARY,
                            chunk.sequence_position,
                            chunk.sequence_position + 1,
                            f"token id {tid} at position {chunk.sequence_position} (vocabulary size {self.vocab_size})",
                        )
                    )
        text = ""
        incomplete = False
        if self.tokenizer is not None:
            text, incomplete, bad = self._decode_stream([c for c in ordered if c.sequence_position not in oov])
            raws.extend(bad)
        raws = _dedupe(raws)
        findings = self._finish(raws, max(len(ordered), 1), "position")
        positions = sorted({p for f in findings for p in range(f.start, f.end)})
        return EncodingIssues(
            findings=findings,
            positions=tuple(positions),
            out_of_vocabulary=tuple(oov),
            duplicates=tuple(sorted(duplicates)),
            out_of_order=tuple(out_of_order),
            text=text,
            incomplete_tail=incomplete,
        )

    def _decode_stream(self, chunks: Sequence[TokenChunk]) -> tuple[str, bool, list[_Raw]]:
        assert self.tokenizer is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        raws: list[_Raw] = []
        pending_since: int | None = None
        for chunk in chunks:
            pos = chunk.sequence_position
            out = decoder.decode(self.tokenizer.token_bytes(chunk.token_id))
            if "\ufffd" in out:
                first = pending_since if pending_since is not None else pos
                at = sum(map(len, parts)) + out.index("\ufffd")
                raws.append(
                    _Raw(
                        CorruptionKind.REPLACEMENT_CHAR,
                        first,
                        pos + 1,
                        f"U+FFFD at character {at} of the decode (invalid bytes in positions {first}..{pos})",
                        units=pos + 1 - first,
                    )
                )
            parts.append(out)
            buffered = decoder.getstate()[0]
            if not buffered:
                pending_since = None
            elif pending_since is None or len(buffered) <= len(self.tokenizer.token_bytes(chunk.token_id)):
                pending_since = pos  # the bytes still waiting all came from this token
        tail = decoder.decode(b"", final=True)
        return "".join(parts) + tail, "\ufffd" in tail, raws

    def detect_token_repetition(self, tokens: Sequence[TokenChunk]) -> tuple[Finding, ...]:
        """Degenerate repetition on the token level: chunks taken in list order, ranges are list indices."""
        ids = [c.token_id for c in tokens]
        run = find_repetition(
            ids,
            max_period=self.repetition_max_period,
            min_repeats=self.repetition_min_repeats,
            min_length=self.token_repetition_min_length,
            tail_share=self.repetition_tail_share,
            window=self.repetition_window,
        )
        if run is None:
            return ()
        raw = _Raw(
            CorruptionKind.DEGENERATE_REPETITION,
            run.start,
            run.end,
            f"ids {ids[run.start : run.start + run.period]} repeated {run.repeats:.1f} times",
        )
        return self._finish([raw], len(ids), "index")


_TABLE_CHARS: Final[frozenset[str]] = frozenset("|+-=:")


def _is_filler_unit(unit: str) -> bool:
    """Layout rather than language: one punctuation, math or drawing character (``"-"``, ``". "``, ``"="``,
    indentation), or table grid (``"|---"``, ``"─┼"``). Letters, digits, emoji or mixed punctuation are not."""
    marks = {ch for ch in unit if not ch.isspace()}
    if len(marks) <= 1:
        return all(
            unicodedata.category(ch)[0] == "P"
            or unicodedata.category(ch) in ("Sm", "Sk")
            or 0x2500 <= ord(ch) <= 0x259F
            for ch in marks
        )
    return all(ch in _TABLE_CHARS or 0x2500 <= ord(ch) <= 0x257F for ch in marks)


def _merge_hits(hits: Sequence[_Hit]) -> list[_Raw]:
    out: list[_Raw] = []
    group: list[_Hit] = []
    for h in [*hits, None]:
        if h is not None and group and group[-1].end == h.start:
            group.append(h)
            continue
        if group:
            bad = "".join(g.decoded for g in group)
            start, end = group[0].start, group[-1].end
            out.append(_Raw(CorruptionKind.MOJIBAKE, start, end, f"reads as {bad!r} when re-decoded as UTF-8"))
        group = [h] if h is not None else []
    return out


def _dedupe(raws: Sequence[_Raw]) -> list[_Raw]:
    seen: set[tuple[CorruptionKind, int, int]] = set()
    out: list[_Raw] = []
    for r in raws:
        key = (r.kind, r.start, r.end)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
