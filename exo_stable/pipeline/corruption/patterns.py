"""The patterns the :class:`~exo_stable.pipeline.corruption.CorruptionDetector` looks for, as pure functions.

Generation loops (:func:`find_repetition`, :func:`is_filler_unit`), format characters and noncharacters that
:func:`~exo_stable.pipeline.validators.bad_characters` lets through (:func:`extra_control`), mojibake
(:func:`mojibake_hits`, :func:`merge_hits`) and invalid UTF-8 byte sequences (:func:`classify_utf8_error`).
"""

from __future__ import annotations

import contextlib
import unicodedata
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Final

from exo_stable.pipeline.corruption.findings import CorruptionKind, RawFinding

__all__ = [
    "MojibakeHit",
    "RepetitionRun",
    "classify_utf8_error",
    "extra_control",
    "find_repetition",
    "is_filler_unit",
    "merge_hits",
    "mojibake_hits",
]


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


_TABLE_CHARS: Final[frozenset[str]] = frozenset("|+-=:")


def is_filler_unit(unit: str) -> bool:
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


def extra_control(text: str, i: int) -> bool:
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
class MojibakeHit:
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


def mojibake_hits(text: str, opaque: frozenset[int]) -> list[MojibakeHit]:
    """Candidate mojibake sequences: runs of Latin-1/cp1252 characters that re-decode as UTF-8."""
    hits: list[MojibakeHit] = []
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
                hits.append(MojibakeHit(start, end, decoded, strong))
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
    out: list[MojibakeHit] = []
    for idx, h in enumerate(hits):
        in_word = (h.start > 0 and text[h.start - 1].isalpha()) or (h.end < n and text[h.end].isalpha())
        strong = h.strong or adjacent[idx] or (lettered[idx] and (in_word or repeated))
        out.append(MojibakeHit(h.start, h.end, h.decoded, strong))
    return out


# ---------------------------------------------------------------------------------------------------------


def merge_hits(hits: Sequence[MojibakeHit]) -> list[RawFinding]:
    out: list[RawFinding] = []
    group: list[MojibakeHit] = []
    for h in [*hits, None]:
        if h is not None and group and group[-1].end == h.start:
            group.append(h)
            continue
        if group:
            bad = "".join(g.decoded for g in group)
            start, end = group[0].start, group[-1].end
            out.append(RawFinding(CorruptionKind.MOJIBAKE, start, end, f"reads as {bad!r} when re-decoded as UTF-8"))
        group = [h] if h is not None else []
    return out


# Bytes
# ---------------------------------------------------------------------------------------------------------


def _is_cont(data: bytes, i: int) -> bool:
    return i < len(data) and 0x80 <= data[i] <= 0xBF


def classify_utf8_error(data: bytes, i: int) -> tuple[CorruptionKind, int, str, bool]:
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
