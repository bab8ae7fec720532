"""KV caches a shard can rewind, and stand-ins for the caches of layers another stage holds.

A stage undoes the cache side of its last forward call or two (a decode step queued or built ahead that the
next input does not use, a spot check's recomputation). A plain ``KVCache`` rewinds by moving its offset.
mlx-lm's ``RotatingKVCache`` (sliding-window layers) overwrites its oldest entry once the window is full, so
moving the offset back would leave the overwritten entry lost: :class:`RewindableRotatingKVCache` keeps the
few states before its last updates and goes back to them.

A family's model code picks each mask from the cache of a particular layer (``cache[0]``, or the first
full-attention / sliding layer). A shard hands the family a cache list as long as the whole model's, in which
the layers it does not hold get a :class:`GhostCache`: it answers ``offset`` and ``make_mask`` exactly as a
cache of that kind in this shard does (every layer of a model has seen the same positions), holds nothing,
and refuses to be written to.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache, create_attention_mask


class RewindableRotatingKVCache(RotatingKVCache):  # type: ignore[misc]
    """A sliding-window cache that can undo its last :data:`HISTORY` updates exactly."""

    HISTORY = 3

    def __init__(self, max_size: int, keep: int = 0) -> None:
        super().__init__(max_size=max_size, keep=keep)
        self._undo: deque[tuple[Any, Any, int, int, int]] = deque(maxlen=self.HISTORY)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # The update may write into the buffers in place; new array objects over the same data take the write,
        # so the old objects keep the state before it (at the price of the write copying the buffer).
        state: Any = self  # mlx-lm's cache is untyped
        self._undo.append((state.keys, state.values, state.offset, state._idx, int(keys.shape[2])))
        if state.keys is not None:
            state.keys, state.values = mx.array(state.keys), mx.array(state.values)
        out: tuple[mx.array, mx.array] = super().update_and_fetch(keys, values)
        return out

    def trim(self, n: int) -> int:
        """Undo the last updates that wrote exactly ``n`` positions; raise if they cannot be undone exactly."""
        state: Any = self
        left = n
        while left > 0 and self._undo and self._undo[-1][4] <= left:
            state.keys, state.values, state.offset, state._idx, tokens = self._undo.pop()
            left -= tokens
        if left > 0:
            raise RuntimeError(f"cannot rewind a sliding-window cache by {n} positions (history exhausted)")
        return n

    def is_trimmable(self) -> bool:
        return bool(self._undo)


class GhostCache:
    """The cache of a layer outside the shard, standing in for the family's mask and offset reads."""

    def __init__(self, twin: KVCache | RotatingKVCache | None, reference: KVCache | RotatingKVCache) -> None:
        self._twin = twin  # a cache of the same kind held by this shard, or None
        self._reference = reference  # any cache of this shard: all have the same offset

    @property
    def offset(self) -> int:
        return int(self._reference.offset)

    def make_mask(self, n: int, window_size: int | None = None, return_array: bool = False) -> Any:
        if self._twin is not None:
            return self._twin.make_mask(n, window_size=window_size, return_array=return_array)
        # No layer of this kind in the shard uses this mask; it is built (lazily) and never evaluated.
        return create_attention_mask(n, self.offset, return_array, window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        raise RuntimeError("a layer outside the shard was asked to write to its cache")
