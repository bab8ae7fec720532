"""Placement planning: split a model's layers over the nodes of a cluster. Pure and deterministic.

:func:`plan_placement` turns a membership (node ids and the memory each has for weights and caches) and a
model's :class:`ModelFootprint` into a :class:`Plan`: contiguous layer ranges ``[start, end)``, one stage per
node, in a fixed node order, stamped with a plan epoch. The same membership always yields the same plan,
whatever order the nodes are listed in.

Rules:

- Nodes are ordered by ``node_id`` unless ``order`` is given. Every node gets a stage (as exo does), unless
  ``max_stages`` or the number of layers limits them: then the nodes with the most memory are used (ties
  by ``node_id``), kept in that order.
- Layer counts are proportional to memory (largest-remainder rounding), at least one per stage, summing to
  ``n_layers``.
- A stage needs ``layers * (bytes_per_layer + kv_bytes_per_layer_reserve)`` plus the embedding table on the
  first stage and the output head on the last (with tied embeddings the last stage holds its own copy of
  the embedding table). A proportional split that overflows some node is rebalanced towards nodes with
  room; only when no split fits is the plan refused with :class:`PlacementError`, whose message names
  every node, its memory and what it would need.
- ``split`` forces exact layer counts; it is checked the same way and never rebalanced.
- ``previous`` (the plan in force) makes placement sticky when stages left it: if every node the rules
  above would use held a stage of ``previous``, the survivors keep their ranges, in ``previous``'s order,
  and the layers of each run of departed stages go to its neighbours (split in half between the stage
  before and the one after, the first half to the one before; all to the one neighbour at either end).
  A survivor then builds only the layers it lacks and the others keep theirs, instead of everyone
  reloading a reshuffled split. When that plan does not fit (or a node joined), the rules above apply.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from exo_stable.engine.modelspec import ModelFootprint, footprint_from_spec

__all__ = [
    "ModelFootprint",
    "NodeResources",
    "PlacementError",
    "Plan",
    "StageAssignment",
    "footprint_from_spec",
    "plan_placement",
]


class PlacementError(ValueError):
    """The model cannot be placed on these nodes (the message says which node lacks what)."""


@dataclass(frozen=True, slots=True)
class NodeResources:
    """A node and the memory it has available for weights and caches, in bytes."""

    node_id: str
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class StageAssignment:
    """One pipeline stage: ``node_id`` runs layers ``[start, end)``."""

    node_id: str
    start: int
    end: int

    @property
    def n_layers(self) -> int:
        """How many layers this stage runs."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Plan:
    """Where each layer of a model runs, for one plan epoch.

    The stages are contiguous, in pipeline order, cover ``[0, n_layers)`` exactly once, and name each node
    at most once (checked on construction).
    """

    epoch: int
    model_fingerprint: str
    n_layers: int
    stages: tuple[StageAssignment, ...]

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise ValueError(f"plan epoch must be non-negative, got {self.epoch}")
        if not self.stages:
            raise ValueError("a plan needs at least one stage")
        expect = 0
        for stage in self.stages:
            if stage.start != expect or stage.end <= stage.start:
                raise ValueError(f"stages are not contiguous non-empty ranges from 0: {self.describe()}")
            expect = stage.end
        if expect != self.n_layers:
            raise ValueError(f"stages cover [0, {expect}) but the model has {self.n_layers} layers")
        if len(set(self.nodes)) != len(self.stages):
            raise ValueError(f"a node appears in more than one stage: {self.describe()}")

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids in pipeline order."""
        return tuple(s.node_id for s in self.stages)

    @property
    def layer_counts(self) -> tuple[int, ...]:
        """Layers per stage, in pipeline order."""
        return tuple(s.n_layers for s in self.stages)

    def stage_of(self, node_id: str) -> int | None:
        """The index of ``node_id``'s stage, or None when the node has no stage."""
        for i, stage in enumerate(self.stages):
            if stage.node_id == node_id:
                return i
        return None

    def describe(self) -> str:
        """A one-line summary, e.g. ``node-a[0,10) node-b[10,30)``."""
        return " ".join(f"{s.node_id}[{s.start},{s.end})" for s in self.stages)


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------


def plan_placement(
    nodes: Sequence[NodeResources],
    footprint: ModelFootprint,
    *,
    epoch: int,
    model_fingerprint: str,
    max_stages: int | None = None,
    split: Sequence[int] | None = None,
    order: Sequence[str] | None = None,
    previous: Sequence[StageAssignment] | None = None,
) -> Plan:
    """Split ``footprint``'s layers over ``nodes`` (see the module docstring for the rules; ``previous``:
    the stages of the plan in force, for a sticky re-plan).

    Raises :class:`PlacementError` when the model does not fit, ``ValueError`` for malformed arguments
    (duplicate node ids, negative memory, an ``order`` that is not a permutation of the node ids, a bad
    ``split`` or ``max_stages``).
    """
    if epoch < 0:
        raise ValueError(f"plan epoch must be non-negative, got {epoch}")
    if not nodes:
        raise PlacementError(f"no nodes to place the model's {footprint.n_layers} layers on")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"node ids must be unique; repeated: {', '.join(dupes)}")
    for node in nodes:
        if node.memory_bytes < 0:
            raise ValueError(f"node {node.node_id} has negative memory {node.memory_bytes}")
    if order is not None:
        if sorted(order) != sorted(ids):
            raise ValueError(f"order {list(order)} must list each node id exactly once: {sorted(ids)}")
        rank = {nid: i for i, nid in enumerate(order)}
    else:
        rank = {nid: i for i, nid in enumerate(sorted(ids))}
    if max_stages is not None and max_stages < 1:
        raise ValueError(f"max_stages must be at least 1, got {max_stages}")

    n = footprint.n_layers
    limit = min(len(nodes), n, max_stages if max_stages is not None else len(nodes))
    chosen = sorted(nodes, key=lambda nd: (-nd.memory_bytes, nd.node_id))[:limit]
    chosen.sort(key=lambda nd: rank[nd.node_id])
    memories = [nd.memory_bytes for nd in chosen]

    if split is not None:
        counts = list(split)
        if len(counts) != len(chosen):
            raise ValueError(
                f"split {counts} has {len(counts)} entries but {len(chosen)} nodes are used "
                f"({', '.join(nd.node_id for nd in chosen)})"
            )
        if any(c < 1 for c in counts) or sum(counts) != n:
            raise ValueError(f"split {counts} must be positive counts summing to the model's {n} layers")
        if not _fits(chosen, footprint, counts):
            raise PlacementError(_refusal(chosen, footprint, counts, "the forced split does not fit"))
    else:
        sticky = None if previous is None else _sticky(chosen, footprint, previous)
        if sticky is not None:
            return Plan(epoch=epoch, model_fingerprint=model_fingerprint, n_layers=n, stages=sticky)
        counts = _proportional(memories, n)
        if not _fits(chosen, footprint, counts):
            counts = _rebalance(chosen, footprint, counts, memories)

    stages: list[StageAssignment] = []
    start = 0
    for node, count in zip(chosen, counts, strict=True):
        stages.append(StageAssignment(node.node_id, start, start + count))
        start += count
    return Plan(epoch=epoch, model_fingerprint=model_fingerprint, n_layers=n, stages=tuple(stages))


def _sticky(
    chosen: Sequence[NodeResources], footprint: ModelFootprint, previous: Sequence[StageAssignment]
) -> tuple[StageAssignment, ...] | None:
    """The survivors of ``previous`` keep their ranges and take over their departed neighbours' layers; None
    when ``chosen`` is not a subset of ``previous``'s nodes, ``previous`` does not cover the model, or the
    result does not fit."""
    ids = {nd.node_id for nd in chosen}
    if not ids <= {s.node_id for s in previous}:
        return None
    if not previous or previous[0].start != 0 or previous[-1].end != footprint.n_layers:
        return None
    if any(a.end != b.start for a, b in itertools.pairwise(previous)):
        return None
    kept = [s for s in previous if s.node_id in ids]
    ranges = {s.node_id: [s.start, s.end] for s in kept}
    i = 0
    while i < len(previous):
        if previous[i].node_id in ids:
            i += 1
            continue
        j = i
        while j < len(previous) and previous[j].node_id not in ids:
            j += 1
        lo, hi = previous[i].start, previous[j - 1].end  # the departed run's layers [lo, hi)
        before = previous[i - 1].node_id if i > 0 else None
        after = previous[j].node_id if j < len(previous) else None
        middle = lo + (hi - lo + 1) // 2 if before is not None and after is not None else None
        if before is not None:
            ranges[before][1] = hi if middle is None else middle
        if after is not None:
            ranges[after][0] = lo if middle is None else middle
        i = j
    stages = tuple(StageAssignment(s.node_id, *ranges[s.node_id]) for s in kept)
    by_id = {nd.node_id: nd for nd in chosen}
    if not _fits([by_id[s.node_id] for s in stages], footprint, [s.n_layers for s in stages]):
        return None
    return stages


def _proportional(weights: Sequence[int], n: int) -> list[int]:
    """Largest-remainder apportionment of ``n`` items by ``weights``, at least one each (exact integers)."""
    k = len(weights)
    total = sum(weights)
    if total == 0:
        weights, total = [1] * k, k
    counts = [n * w // total for w in weights]
    by_remainder = sorted(range(k), key=lambda i: (-(n * weights[i] % total), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    # At least one layer per stage: take the surplus from the stages furthest above their ideal share.
    for i in range(k):
        counts[i] = max(counts[i], 1)
    while sum(counts) > n:
        donors = [i for i in range(k) if counts[i] > 1]
        i = max(donors, key=lambda j: (counts[j] * total - n * weights[j], -j))
        counts[i] -= 1
    return counts


def _fits(chosen: Sequence[NodeResources], footprint: ModelFootprint, counts: Sequence[int]) -> bool:
    k = len(chosen)
    pairs = enumerate(zip(chosen, counts, strict=True))
    return all(footprint.stage_bytes(i, k, c) <= nd.memory_bytes for i, (nd, c) in pairs)


def _capacity(node: NodeResources, footprint: ModelFootprint, stage: int, n_stages: int) -> int:
    """The most layers ``node`` can hold as stage ``stage`` (negative when not even its fixed part fits)."""
    room = node.memory_bytes - footprint.fixed_bytes(stage, n_stages)
    if room < 0:
        return -1
    if footprint.per_layer == 0:
        return footprint.n_layers
    return room // footprint.per_layer


def _rebalance(
    chosen: Sequence[NodeResources], footprint: ModelFootprint, counts: Sequence[int], memories: Sequence[int]
) -> list[int]:
    """Move layers from nodes over budget to nodes with room, closest to the proportional shares."""
    k, n = len(chosen), footprint.n_layers
    caps = [_capacity(nd, footprint, i, k) for i, nd in enumerate(chosen)]
    if any(c < 1 for c in caps):
        raise PlacementError(_refusal(chosen, footprint, counts, "a node cannot hold even one layer"))
    if sum(caps) < n:
        raise PlacementError(_refusal(chosen, footprint, counts, "the nodes together have too little memory"))
    weights = memories if sum(memories) else [1] * k
    new = [min(c, cap) for c, cap in zip(counts, caps, strict=True)]
    while sum(new) < n:
        room = [i for i in range(k) if new[i] < caps[i]]
        # Highest averages (D'Hondt): the stage with the most memory per layer once it takes the next one
        # gets it (ties: earliest stage), so the overflow spreads in proportion to memory.
        i = max(room, key=lambda j: (Fraction(weights[j], new[j] + 1), -j))
        new[i] += 1
    return new


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.2f} {unit} ({n} B)"


def _refusal(chosen: Sequence[NodeResources], footprint: ModelFootprint, counts: Sequence[int], reason: str) -> str:
    """A refusal naming each node, its memory and what it would need."""
    k = len(chosen)
    total_need = sum(footprint.stage_bytes(i, k, c) for i, c in enumerate(counts))
    total_have = sum(nd.memory_bytes for nd in chosen)
    lines = [
        f"cannot place {footprint.n_layers} layers on {k} node(s): {reason}; the model needs "
        f"{_fmt_bytes(total_need)} over {k} stage(s), the nodes have {_fmt_bytes(total_have)}"
    ]
    for i, (nd, c) in enumerate(zip(chosen, counts, strict=True)):
        need = footprint.stage_bytes(i, k, c)
        fixed = footprint.fixed_bytes(i, k)
        parts = [f"{c} layer(s)"]
        if fixed:
            parts.append(f"{_fmt_bytes(fixed)} embeddings/head")
        verdict = "ok" if need <= nd.memory_bytes else "over budget"
        lines.append(
            f"  {nd.node_id}: has {_fmt_bytes(nd.memory_bytes)}, needs {_fmt_bytes(need)} "
            f"for {' + '.join(parts)} (at least {_fmt_bytes(footprint.stage_bytes(i, k, 1))} for one layer): "
            f"{verdict}"
        )
    return "\n".join(lines)
