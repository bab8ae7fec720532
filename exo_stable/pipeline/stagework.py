"""What a stage computes on its MLX thread for one step, or for the decode steps of several requests at once.

Every method runs on the stage's MLX thread (:class:`~exo_stable.engine.mlx_thread.MlxThread`); the actor
(:mod:`exo_stable.pipeline.stage`) submits them and sends their results on. A step's result is
``(dtype, shape, bytes, source checksum)`` of the hidden states out (the checksum only for strict requests,
else -1), or on the last stage the :class:`~exo_stable.engine.sampling.Pick` of the request's own sampler
(None for a prompt chunk that is not the last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from exo_stable.engine.sampling import Pick
from exo_stable.engine.slicing import SlicedForward
from exo_stable.engine.stagecompute import StageCompute, UnknownRequest
from exo_stable.engine.wire import input_array, tensor_to_bytes
from exo_stable.pipeline.levels import ValidationLevel
from exo_stable.pipeline.stagebatch import ReadyStep
from exo_stable.pipeline.stagefaults import StageFaults
from exo_stable.pipeline.stagestate import SpotCheckMismatch, StageStats
from exo_stable.wire.messages import tensor_checksum

Checks = tuple[ValidationLevel, bool]
"""A step's validation level, and whether it is spot-checked (computed twice, compared bit for bit)."""


@dataclass
class StageWork:
    compute: StageCompute
    index: int  # the stage's place in the plan
    is_last: bool
    faults: StageFaults  # injected integrity faults (tests only; off unless configured)
    stats: StageStats

    def step(self, ready: ReadyStep, checks: Checks, *, ahead: bool | None = None, forced: int | None = None) -> Any:
        """One step alone: through the step's prepared graph when :meth:`StageCompute.prepare` built one.

        ``checks``: see :data:`Checks` (a spot check raises :class:`SpotCheckMismatch`). ``ahead``: a greedy step
        of a one-stage plan, through :meth:`StageCompute.pick_ahead` (queueing the next step when true).
        ``forced``: a replay's known token at the step's position, which the penalties of later positions see."""
        if ahead is not None:
            return Pick(self.compute.pick_ahead(ready.rid, ready.tokens, queue_next=ahead))
        out = self.compute.forward_input(ready.rid, ready.tokens, ready.wire)
        return self.finish(ready, input_array(ready.tokens, ready.wire), out, checks=checks, forced=forced)

    def begin(self, ready: ReadyStep, checks: Checks) -> SlicedForward:
        """A prompt chunk's step, its graph built to be evaluated a few layers at a time beside other
        requests' decode steps (:mod:`exo_stable.engine.slicing`); :meth:`finish_sliced` once evaluated."""
        x = input_array(ready.tokens, ready.wire)
        # On the last stage a chunk before the prompt's last yields no token: its logits are never computed,
        # unless a spot check compares them.
        return self.compute.begin(ready.rid, x, logits=ready.final or checks[1])

    def finish_sliced(self, ready: ReadyStep, call: SlicedForward, checks: Checks, forced: int | None) -> Any:
        """What :meth:`step` returns for the chunk, from its evaluated call."""
        x = input_array(ready.tokens, ready.wire)
        if call.result is None:
            return None  # (the last stage's chunk before the last, not spot-checked: finish returns None too)
        return self.finish(ready, x, call.result, checks=checks, forced=forced)

    def rows(
        self,
        rows: list[ReadyStep],
        checks: list[Checks],
        forced: list[int | None],
        *,
        follow: Sequence[int] | None = None,
    ) -> list[Any]:
        """The decode steps of several requests as one :meth:`StageCompute.forward_batch` call; per row, what
        :meth:`step` returns for it alone, or the exception of that row alone (:class:`UnknownRequest` for a
        request closed meanwhile, :class:`SpotCheckMismatch`). A spot-checked row is recomputed alone and must
        equal its batched result bit for bit: a live check that batching changes no row.

        ``follow``: greedy rows of a one-stage plan, none spot-checked; the next step of the rows at these
        indices is queued before this one's tokens are read (:meth:`StageCompute.pick_rows_ahead`)."""
        results: list[Any] = [UnknownRequest(r.rid) for r in rows]
        live = [i for i, r in enumerate(rows) if r.rid in self.compute.requests]
        if follow is not None and len(live) == len(rows):
            return self._rows_ahead(rows, follow)
        xs = [input_array(rows[i].tokens, rows[i].wire) for i in live]
        rids = [rows[i].rid for i in live]
        outs = self.compute.forward_batch(rids, xs)
        tops = self.compute.greedy_tops(rids, outs) if self.is_last else [None] * len(outs)
        for i, x, out, top in zip(live, xs, outs, tops, strict=True):
            try:
                results[i] = self.finish(rows[i], x, out, checks=checks[i], forced=forced[i], top=top)
            except SpotCheckMismatch as exc:
                results[i] = exc
        return results

    def _rows_ahead(self, rows: list[ReadyStep], follow: Sequence[int]) -> list[Pick]:
        """:meth:`rows` through :meth:`StageCompute.pick_rows_ahead`, the rows taken in the order of the step
        queued ahead when they are its rows (the stage's queue may hand them in another order)."""
        at = {r.rid: i for i, r in enumerate(rows)}
        queued = self.compute.queued_rows()
        order = (
            [at[rid] for rid in queued] if len(queued) == len(rows) and set(queued) == set(at) else list(at.values())
        )
        place = {i: k for k, i in enumerate(order)}
        picks = self.compute.pick_rows_ahead(
            [rows[i].rid for i in order], [rows[i].tokens[0] for i in order], sorted(place[i] for i in follow)
        )
        results: list[Pick] = [Pick(0)] * len(rows)
        for k, i in enumerate(order):
            results[i] = Pick(picks[k])
        return results

    def finish(
        self,
        ready: ReadyStep,
        x: mx.array,
        out: mx.array,
        *,
        checks: Checks,
        forced: int | None,
        top: int | None = None,
    ) -> Any:
        """One step's output as it leaves the stage (see the module docstring); ``top``: the row's argmax when
        taken with other rows' (:meth:`StageCompute.greedy_tops`)."""
        level, spot = checks
        if not self.is_last:
            dtype, shape, data = tensor_to_bytes(out)
            data = self.faults.compute(dtype, data)  # injected for tests only; off unless configured
            if spot:
                self.spot_check(ready.rid, x, data)
            source = tensor_checksum(data) if level is ValidationLevel.STRICT else -1
            return dtype, shape, data, source
        if spot:
            self.spot_check(ready.rid, x, tensor_to_bytes(out)[2])
        return self.compute.choose(ready.rid, out, ready.position, forced, top=top) if ready.final else None

    def spot_check(self, rid: str, x: mx.array, first: bytes) -> None:
        """Rewind the request's caches by this step and compute it again, alone; the two outputs must be the
        same bytes. Catches a transient fault of this stage's compute or memory (and, for a batched step, a
        row that batching changed); a fault that repeats identically (bad weights) is not caught here."""
        self.stats.spot_checks += 1
        self.compute.rewind(rid, int(x.shape[1]))
        again = tensor_to_bytes(self.compute.forward(rid, x))[2]
        if again != first:
            at = next((i for i, (a, b) in enumerate(zip(first, again, strict=False)) if a != b), len(first))
            raise SpotCheckMismatch(
                f"stage {self.index} computed the step twice; the results differ at byte {at} of {len(first)}"
            )


__all__ = ["Checks", "StageWork"]
