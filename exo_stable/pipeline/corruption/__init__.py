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

from exo_stable.pipeline.corruption.detector import CorruptionDetector
from exo_stable.pipeline.corruption.findings import CorruptionAnalysis, CorruptionKind, EncodingIssues, Finding
from exo_stable.pipeline.corruption.patterns import RepetitionRun, find_repetition

__all__ = [
    "CorruptionAnalysis",
    "CorruptionDetector",
    "CorruptionKind",
    "EncodingIssues",
    "Finding",
    "RepetitionRun",
    "find_repetition",
]
