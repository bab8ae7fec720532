"""Under ``--batch fast``: the KV caches of a shard's batched requests in one buffer per layer.

With a cache per request, a batched decode step writes and attends row by row: on a GPU, 32 layers x 16 rows
of small kernels a step cost more than all the step's batched matrix products (benchmarks/batch_step_parts.py).
Here up to ``slots`` requests keep their keys and values in one ``[slots, heads, capacity, dim]`` buffer per
layer, so a batched step writes every row's position with one scatter and attends with one call over the
rows, each masked to its own length. A request starts with a cache of its own (a stream alone never pays for
the shared buffers) and moves into a free slot the first time it shares a step; its lone calls after that
(a prompt chunk, a lone step) write and read its slot as a cache of its own would.

Only ``--batch fast`` uses this: one attention call over rows of different lengths need not round each row
as a lone call does, which ``--batch exact`` does not allow. The buffer is as long as its longest request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

STEP = 256
"""Positions the buffers grow by (all slots at once)."""


class SlotArena:
    """One layer range's buffers for ``slots`` requests (MLX thread only)."""

    def __init__(self, layers: int, slots: int) -> None:
        self.slots = slots
        self.keys: list[mx.array | None] = [None] * layers
        self.values: list[mx.array | None] = [None] * layers
        self._free = list(range(slots - 1, -1, -1))

    def take(self) -> int | None:
        """A free slot, or None when every slot is held (the request then gets a cache of its own)."""
        return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def reserve(self, layer: int, needed: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """The layer's buffers, grown (for every slot) to hold ``needed`` positions; shapes from ``keys``."""
        k, v = self.keys[layer], self.values[layer]
        if k is not None and v is not None and needed <= k.shape[2]:
            return k, v
        capacity = -(-needed // STEP) * STEP
        _, heads, _, k_dim = keys.shape
        new_k = mx.zeros((self.slots, heads, capacity, k_dim), keys.dtype)
        new_v = mx.zeros((self.slots, heads, capacity, values.shape[3]), values.dtype)
        if k is not None and v is not None:
            new_k[:, :, : k.shape[2], :] = k
            new_v[:, :, : v.shape[2], :] = v
        self.keys[layer], self.values[layer] = new_k, new_v
        return new_k, new_v

    def move_in(self, caches: list[KVCache], slot: int) -> list[SlotCache]:
        """A request's own caches copied into ``slot`` (once, when it first shares a step); its slot caches."""
        out = []
        for layer, cache in enumerate(caches):
            moved = SlotCache(self, layer, slot)
            keys, values = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
            k, v = self.reserve(layer, cache.offset, keys, values)
            k[slot : slot + 1, :, : cache.offset, :] = keys
            v[slot : slot + 1, :, : cache.offset, :] = values
            moved.offset = cache.offset
            out.append(moved)
        return out

    def nbytes(self) -> int:
        """Bytes of every layer's buffers (all slots)."""
        arrays = [a for a in (*self.keys, *self.values) if a is not None]
        return sum(int(a.nbytes) for a in arrays)

    def slot_bytes(self, layer: int) -> int:
        k, v = self.keys[layer], self.values[layer]
        return 0 if k is None or v is None else (int(k.nbytes) + int(v.nbytes)) // self.slots


class SlotCache(KVCache):  # type: ignore[misc]
    """One request's cache of one layer: its slot of the layer's buffers."""

    def __init__(self, arena: SlotArena, layer: int, slot: int) -> None:
        super().__init__()
        self.arena = arena
        self.layer = layer
        self.slot = slot

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, n = self.offset, keys.shape[2]
        k, v = self.arena.reserve(self.layer, prev + n, keys, values)
        row = slice(self.slot, self.slot + 1)
        k[row, :, prev : prev + n, :] = keys
        v[row, :, prev : prev + n, :] = values
        self.offset += n
        return k[row, :, : self.offset, :], v[row, :, : self.offset, :]

    def empty(self) -> bool:
        return bool(self.offset == 0)

    @property
    def state(self) -> Any:
        raise NotImplementedError("a slot cache is not saved")

    @property
    def nbytes(self) -> int:
        return self.arena.slot_bytes(self.layer)


class StepIndex:
    """What every layer of one batched step indexes its slots with: the rows' slots, the positions they write
    and the mask of the positions they read (and their offsets, for the rotary embedding). A request's caches
    have the same slot and length at every layer, so these are built once per step, not once per layer (each
    is a small array the device gets)."""

    def __init__(self) -> None:
        self._built: dict[str, mx.array] = {}

    def get(self, name: str, build: Callable[[], mx.array]) -> mx.array:
        """The step's ``name`` array, built by ``build`` at its first use."""
        found = self._built.get(name)
        if found is None:
            found = self._built[name] = build()
        return found


class SlotRows:
    """One layer of a batched step whose rows all hold slots of one arena: one write, one attention call."""

    def __init__(self, caches: list[SlotCache], index: StepIndex) -> None:
        self.caches = caches
        self.arena = caches[0].arena
        self.layer = caches[0].layer
        slots = [c.slot for c in caches]
        self._index = index
        self._slots = index.get("slots", lambda: mx.array(slots, dtype=mx.int32))
        self._all = slots == list(range(self.arena.slots))  # every slot, in order: no gather needed
        self._offsets = [c.offset for c in caches]
        self._fetched: tuple[mx.array, mx.array] | None = None

    @staticmethod
    def fits(caches: list[Any]) -> bool:
        """Whether ``caches`` (one per row) are slots of one arena's layer."""
        first = caches[0]
        return isinstance(first, SlotCache) and all(
            isinstance(c, SlotCache) and c.arena is first.arena and c.layer == first.layer for c in caches
        )

    def update(self, keys: mx.array, values: mx.array) -> None:
        """Write each row's one position into its slot (``keys``: ``[rows, heads, 1, dim]``)."""
        longest = max(self._offsets) + 1
        k, v = self.arena.reserve(self.layer, longest, keys, values)
        heads = self._index.get(f"heads{keys.shape[1]}", lambda: mx.arange(keys.shape[1])[None, :])
        where = self._index.get("where", lambda: mx.array(self._offsets, dtype=mx.int32)[:, None])
        k[self._slots[:, None], heads, where] = keys[:, :, 0, :]
        v[self._slots[:, None], heads, where] = values[:, :, 0, :]
        for cache in self.caches:
            cache.offset += 1
        self._fetched = (k, v)

    def _mask(self, dtype: mx.Dtype) -> mx.array:
        """Which of the step's ``longest`` positions each row reads (its own: the first ``offset + 1``), as
        the additive mask (0 read, -inf not) in the queries' dtype. A boolean mask gives the same scores, but
        MLX's GPU kernels take additive masks only and would convert it again at every layer."""
        longest = max(self._offsets) + 1
        lengths = mx.array([o + 1 for o in self._offsets], dtype=mx.int32)
        reads = (mx.arange(longest)[None, :] < lengths[:, None]).reshape(len(self.caches), 1, 1, longest)
        return mx.where(reads, mx.array(0, dtype=dtype), mx.array(-mx.inf, dtype=dtype))

    def attend(self, queries: mx.array, scale: float) -> mx.array:
        """Every row's attention over its own positions, in one call."""
        if self._fetched is None:
            raise RuntimeError("batched attention before its rows' keys and values were written")
        k, v = self._fetched
        self._fetched = None
        longest = max(self._offsets) + 1
        keys, values = k[:, :, :longest, :], v[:, :, :longest, :]
        if not self._all:
            keys, values = mx.take(keys, self._slots, axis=0), mx.take(values, self._slots, axis=0)
        mask = self._index.get(f"mask{queries.dtype}", lambda: self._mask(queries.dtype))
        out: mx.array = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
        return out
