"""A prompt chunk's forward call evaluated a few layers at a time, beside the decode steps of other requests.

On a CPU a forward call is bound by its arithmetic: a 128-token chunk through the default model's 30 layers
takes about ten decode steps' time, and a step that carries it makes every stream already decoding wait
that long for its next token. A smaller chunk would cut the wait but changes the prompt's bits (a product's
row depends on how many rows it has) and reads every prompt more slowly. Instead the chunk's graph is built
whole, once, and evaluated in slices of layers: each compute step evaluates the next few layers' outputs
(:meth:`SlicedForward.advance`) beside the decode rows. MLX evaluates lazily and an evaluation boundary
changes no kernel, so the chunk's result is bit for bit that of one :meth:`StageCompute.forward` call
(tests/test_slicing.py checks it); only when it is computed moves.

:class:`SliceClock` decides each step's slices: the step's chunks, in order, get as many layers as take about
:data:`PREFILL_SHARE` times the decode rows' own step time between them (from what it measured of both),
the first chunk at least one layer; all that is left when no row is decoding. Pure bookkeeping: it runs no
MLX.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mlx.core as mx

PREFILL_SHARE = 1.0
"""A prompt slice's time per step, against the decode rows' step time, while requests decode beside it.

1.0 gives a prompt about half of a busy step: the streams' inter-token time stays near twice its value
without the prompt, and the prompt is read at about half its speed alone (benchmarks/bench_batching.py
measures both)."""

_WEIGHT = 0.3
"""The weight of the newest measurement in the clock's moving averages."""


class SlicedForward:
    """A forward call's graph, built and not yet evaluated: its layers' outputs in order and its result."""

    def __init__(
        self, layers: list[mx.array], result: mx.array | None, positions: int, done: Callable[[float], None]
    ) -> None:
        self._layers: list[mx.array | None] = list(layers)
        self.positions = positions  # the chunk's width
        self.result = result  # None: not wanted (a prompt chunk before the last: only its cache entries are)
        self._done = done
        self._next = 0
        self.seconds = 0.0  # evaluation time so far
        self.stepped = 0  # layers the last advance evaluated
        self.stepped_s = 0.0  # ... and their time (the result's, after the last layer, not included)

    @property
    def left(self) -> int:
        """Layers not evaluated yet (the result, after the last layer, counts as part of the last one)."""
        return max(0, len(self._layers) - self._next)

    @property
    def finished(self) -> bool:
        return self._next > len(self._layers)

    def advance(self, layers: int) -> bool:
        """Evaluate the next ``layers`` layers (at least one; with the result once none is left). Returns
        whether the call is finished, its :attr:`result` evaluated. A layer's output depends on its cache
        entries (attention reads them), so evaluating it writes them: a call whose result is not wanted is
        finished with its last layer."""
        if self.finished:
            return True
        started = time.perf_counter()
        end = min(self._next + max(1, layers), len(self._layers))
        self.stepped = end - self._next
        if end > self._next:
            out = self._layers[end - 1]
            assert out is not None
            mx.eval(out)
            for i in range(self._next, end):
                self._layers[i] = None  # evaluated: the graph behind it is gone, the array no longer needed
            self._next = end
        self.stepped_s = time.perf_counter() - started
        if self._next == len(self._layers):
            if self.result is not None:
                mx.eval(self.result)
            self._next += 1
        self.seconds += time.perf_counter() - started
        if self.finished:
            self._done(self.seconds)
        return self.finished


class SliceClock:
    """How many of a prompt chunk's layers one compute step evaluates (see the module docstring)."""

    def __init__(self, share: float | None = PREFILL_SHARE) -> None:
        self.share = share  # None: never slice (a chunk's call is evaluated whole, as before slicing)
        self.decode_s: float | None = None  # the decode rows' step time (moving average)
        self.layer_s: float | None = None  # one layer's time for one prompt position (moving average)

    @staticmethod
    def _mix(old: float | None, new: float) -> float:
        return new if old is None else (1 - _WEIGHT) * old + _WEIGHT * new

    def decoded(self, seconds: float) -> None:
        """A step's decode rows took ``seconds``."""
        self.decode_s = self._mix(self.decode_s, seconds)

    def sliced(self, layers: int, positions: int, seconds: float) -> None:
        """A slice of ``layers`` layers of a ``positions``-position prompt chunk took ``seconds``. (Per
        position: a chunk's layer costs about its width, and a short prompt's chunk must not make the next
        long one's slices too big.)"""
        if layers > 0 and positions > 0:
            self.layer_s = self._mix(self.layer_s, seconds / (layers * positions))

    def budget(self, *, decoding: bool) -> float | None:
        """Seconds of prompt layers one step may evaluate, shared by all the step's chunks in order: None
        when nobody decodes beside them (or slicing is off), so they all go whole; 0 before the decode rows
        were measured (then the first chunk gets one layer, the others wait)."""
        if not decoding or self.share is None:
            return None
        return 0.0 if self.decode_s is None else self.share * self.decode_s

    def layers(self, left: int, positions: int, within: float | None) -> int:
        """The slice of a ``positions``-position chunk with ``left`` layers to go, in ``within`` seconds of
        the step's :meth:`budget` (None: the whole rest); at least one layer."""
        if within is None:
            return left
        if self.layer_s is None or self.layer_s <= 0:
            return 1  # nothing measured yet: one layer, which measures
        return max(1, min(left, int(within / (self.layer_s * max(1, positions)))))


__all__ = ["PREFILL_SHARE", "SliceClock", "SlicedForward"]
