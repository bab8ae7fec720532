"""The :class:`CorruptionDetector`: weighs the patterns found in text, bytes and token chunks into findings.

Pure logic (no IO, no asyncio, no MLX); what each kind means is in the package docstring.
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

from exo_stable.pipeline.corruption.findings import (
    ALWAYS_RECOVERABLE,
    BASE_SEVERITY,
    SEVERITY_RANK,
    CorruptionAnalysis,
    CorruptionKind,
    EncodingIssues,
    Finding,
    RawFinding,
    Unit,
)
from exo_stable.pipeline.corruption.patterns import (
    classify_utf8_error,
    extra_control,
    find_repetition,
    is_filler_unit,
    merge_hits,
    mojibake_hits,
)
from exo_stable.pipeline.validators import bad_characters
from exo_stable.wire.messages import CorruptionSeverity, TokenChunk

if TYPE_CHECKING:
    from exo_stable.tokenizer import Tokenizer

__all__ = ["CorruptionDetector"]


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

    def _finish(self, raws: Sequence[RawFinding], total: int, unit: Unit) -> tuple[Finding, ...]:
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
                severity = BASE_SEVERITY[r.kind]
                if units >= self.escalate_min_units:
                    if share >= self.critical_share:
                        severity = CorruptionSeverity.CRITICAL
                    elif share >= self.high_share and SEVERITY_RANK[severity] < 2:
                        severity = CorruptionSeverity.HIGH
            if r.kind is CorruptionKind.MOJIBAKE and severity is CorruptionSeverity.CRITICAL:
                severity = CorruptionSeverity.HIGH  # garbled only in appearance: re-decoding restores it
            # Mojibake is re-decoded; a loop is cut where it starts and the rest regenerated.
            recoverable = r.kind in ALWAYS_RECOVERABLE or severity is not CorruptionSeverity.CRITICAL
            out.append(Finding(r.kind, r.start, r.end, severity, recoverable, r.detail, unit))
        out.sort(key=lambda f: (f.start, f.end, f.kind.value))
        return tuple(out)

    # ------------------------------------------------------------------------------------------ text

    def _text_raws(self, text: str, opaque: frozenset[int] = frozenset()) -> list[RawFinding]:
        raws: list[RawFinding] = []
        covered: set[int] = set(opaque)
        hits = mojibake_hits(text, frozenset(opaque))
        if any(h.strong for h in hits):
            for h in merge_hits(hits):
                raws.append(h)
                covered.update(range(h.start, h.end))
        bad = set(bad_characters(text))
        bad.update(i for i, ch in enumerate(text) if (ord(ch) >= 0xAD or ch == "\x7f") and extra_control(text, i))
        run: RawFinding | None = None
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
                run = RawFinding(
                    kind, run.start, i + 1, f"{run.detail}, {desc}" if len(run.detail) < 120 else run.detail
                )
                continue
            if run is not None:
                raws.append(run)
            run = RawFinding(kind, i, i + 1, desc)
        if run is not None:
            raws.append(run)
        rep = self._text_repetition(text)
        if rep is not None:
            raws.append(rep)
        return raws

    def _text_repetition(self, text: str) -> RawFinding | None:
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
        if is_filler_unit(unit) and run.length < self.filler_min_length:
            return None
        return RawFinding(
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
        raws: list[RawFinding] = []
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
            kind, length, desc, at_end = classify_utf8_error(data, end)
            if at_end and not final:
                break
            bad = data[end : end + length]
            raws.append(RawFinding(kind, end, end + length, f"{desc} {bad!r} at byte {end}"))
            opaque.add(len(chars))
            chars.append("\ufffd")
            offsets.append(end)
            pos = end + length
        offsets.append(pos if pos < n and not final else n)
        text = "".join(chars)
        merged: list[RawFinding] = []
        for r in raws:  # adjacent stray bytes of one kind are one finding
            if merged and merged[-1].kind is r.kind and merged[-1].end == r.start:
                prev = merged.pop()
                merged.append(RawFinding(r.kind, prev.start, r.end, prev.detail + "; " + r.detail))
            else:
                merged.append(r)
        for t in self._text_raws(text, frozenset(opaque)):
            start, end = offsets[t.start], offsets[t.end]
            merged.append(RawFinding(t.kind, start, end, t.detail))
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
        raws: list[RawFinding] = []
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
                        RawFinding(
                            CorruptionKind.SEQUENCE_DISORDER,
                            pos,
                            pos + 1,
                            f"position {pos} arrived twice with different tokens "
                            f"({seen[pos].token_id} and {chunk.token_id})",
                        )
                    )
                else:
                    raws.append(
                        RawFinding(CorruptionKind.SEQUENCE_DISORDER, pos, pos + 1, f"position {pos} duplicated")
                    )
            else:
                seen[pos] = chunk
            if previous is not None and pos < previous:
                out_of_order.append(pos)
                if pos not in duplicates:
                    raws.append(
                        RawFinding(CorruptionKind.SEQUENCE_DISORDER, pos, pos + 1, f"position {pos} after {previous}")
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
                        RawFinding(
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

    def _decode_stream(self, chunks: Sequence[TokenChunk]) -> tuple[str, bool, list[RawFinding]]:
        assert self.tokenizer is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        raws: list[RawFinding] = []
        pending_since: int | None = None
        for chunk in chunks:
            pos = chunk.sequence_position
            out = decoder.decode(self.tokenizer.token_bytes(chunk.token_id))
            if "\ufffd" in out:
                first = pending_since if pending_since is not None else pos
                at = sum(map(len, parts)) + out.index("\ufffd")
                raws.append(
                    RawFinding(
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
        raw = RawFinding(
            CorruptionKind.DEGENERATE_REPETITION,
            run.start,
            run.end,
            f"ids {ids[run.start : run.start + run.period]} repeated {run.repeats:.1f} times",
        )
        return self._finish([raw], len(ids), "index")


def _dedupe(raws: Sequence[RawFinding]) -> list[RawFinding]:
    seen: set[tuple[CorruptionKind, int, int]] = set()
    out: list[RawFinding] = []
    for r in raws:
        key = (r.kind, r.start, r.end)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
