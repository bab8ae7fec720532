"""What the :class:`~exo_stable.pipeline.corruption.CorruptionDetector` reports: kinds, findings, verdicts.

Pure data (no IO): :class:`CorruptionKind` and its mapping to the wire's coarser :class:`CorruptionType`, the
base severity of each kind, one :class:`Finding` per stretch of corruption, and the two verdicts
(:class:`CorruptionAnalysis` on text or bytes, :class:`EncodingIssues` on token chunks). :class:`RawFinding`
is a finding before the detector has weighed its severity.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from exo_stable.wire.messages import CorruptionReport, CorruptionSeverity, CorruptionType

__all__ = [
    "ALWAYS_RECOVERABLE",
    "BASE_SEVERITY",
    "CORRUPTION_TYPE",
    "SEVERITY_RANK",
    "CorruptionAnalysis",
    "CorruptionKind",
    "EncodingIssues",
    "Finding",
    "RawFinding",
    "Unit",
]


class CorruptionKind(enum.StrEnum):
    """The detector's fine-grained kinds of corruption (see the package docstring)."""

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

BASE_SEVERITY: Final[dict[CorruptionKind, CorruptionSeverity]] = {
    CorruptionKind.REPLACEMENT_CHAR: CorruptionSeverity.MEDIUM,
    CorruptionKind.INVALID_UTF8: CorruptionSeverity.MEDIUM,
    CorruptionKind.OVERLONG_UTF8: CorruptionSeverity.HIGH,
    CorruptionKind.CONTROL_CHAR: CorruptionSeverity.LOW,
    CorruptionKind.MOJIBAKE: CorruptionSeverity.MEDIUM,
    CorruptionKind.OUT_OF_VOCABULARY: CorruptionSeverity.HIGH,
    CorruptionKind.DEGENERATE_REPETITION: CorruptionSeverity.LOW,
    CorruptionKind.SEQUENCE_DISORDER: CorruptionSeverity.HIGH,
}

ALWAYS_RECOVERABLE: Final[frozenset[CorruptionKind]] = frozenset(
    {CorruptionKind.MOJIBAKE, CorruptionKind.DEGENERATE_REPETITION}
)

SEVERITY_RANK: Final[dict[CorruptionSeverity, int]] = {
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


def worst_of(findings: Sequence[Finding]) -> CorruptionSeverity | None:
    if not findings:
        return None
    return max((f.severity for f in findings), key=SEVERITY_RANK.__getitem__)


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
        return worst_of(self.findings)

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
        return worst_of(self.findings)


@dataclass(frozen=True, slots=True)
class RawFinding:
    """A stretch of one kind before its severity is weighed; ``units``, when set, replaces ``end - start``."""

    kind: CorruptionKind
    start: int
    end: int
    detail: str
    units: int = field(default=0)
