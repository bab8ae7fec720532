"""Placement planning: contiguous, complete, deterministic, proportional, and refused clearly when it cannot fit."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.engine.modelspec import ModelSpec
from exo_stable.pipeline.placement import (
    ModelFootprint,
    NodeResources,
    PlacementError,
    Plan,
    StageAssignment,
    footprint_from_spec,
    plan_placement,
)

GIB = 1 << 30


def fp(n_layers: int = 30, per_layer: int = 1, embed: int = 0, head: int = 0, kv: int = 0) -> ModelFootprint:
    return ModelFootprint(
        n_layers=n_layers, bytes_per_layer=per_layer, embed_bytes=embed, head_bytes=head, kv_bytes_per_layer_reserve=kv
    )


def nodes(**memory: int) -> list[NodeResources]:
    return [NodeResources(k.replace("_", "-"), v) for k, v in memory.items()]


def plan(ns: list[NodeResources], footprint: ModelFootprint, **kw: object) -> Plan:
    return plan_placement(ns, footprint, epoch=3, model_fingerprint="fp", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- table


@pytest.mark.parametrize(
    ("memory", "footprint", "kw", "expected"),
    [
        # equal memory: equal split, node_id order
        ({"b": 100, "a": 100}, fp(30), {}, "a[0,15) b[15,30)"),
        # proportional 1:2
        ({"a": 100, "b": 200}, fp(30), {}, "a[0,10) b[10,30)"),
        # largest remainder: 10/3 each -> 4,3,3 (first remainder tie goes to the earliest)
        ({"a": 100, "b": 100, "c": 100}, fp(10), {}, "a[0,4) b[4,7) c[7,10)"),
        # one node takes everything
        ({"solo": 10}, fp(7), {}, "solo[0,7)"),
        # more nodes than layers: the two with most memory, kept in node_id order
        ({"a": 5, "b": 9, "c": 7}, fp(2), {}, "b[0,1) c[1,2)"),
        # max_stages picks the largest, ties by node_id
        ({"a": 50, "b": 50, "c": 50, "d": 10}, fp(12), {"max_stages": 2}, "a[0,6) b[6,12)"),
        # explicit order
        ({"a": 100, "b": 200}, fp(30), {"order": ["b", "a"]}, "b[0,20) a[20,30)"),
        # forced split
        ({"a": 100, "b": 100, "c": 100}, fp(30), {"split": [10, 12, 8]}, "a[0,10) b[10,22) c[22,30)"),
        # tiny share still gets a layer
        ({"a": 1, "b": 1000}, fp(10), {}, "a[0,1) b[1,10)"),
        # rebalance: proportional would give a 12 layers but its embeddings leave room for 10
        ({"a": 100, "b": 155}, fp(30, per_layer=5, embed=50, head=5), {}, "a[0,10) b[10,30)"),
        # tied head: the last stage holds a copy of the embeddings
        ({"a": 100, "b": 100}, fp(20, per_layer=5, embed=30), {}, "a[0,10) b[10,20)"),
        ({"a": 100, "b": 100}, fp(28, per_layer=5, embed=30), {}, "a[0,14) b[14,28)"),
        # kv reserve counts per layer: 10 layers of (4+1) = 50 fits exactly
        ({"a": 50, "b": 50}, fp(20, per_layer=4, kv=1), {}, "a[0,10) b[10,20)"),
    ],
)
def test_table(memory: dict[str, int], footprint: ModelFootprint, kw: dict[str, object], expected: str) -> None:
    p = plan(nodes(**memory), footprint, **kw)
    assert p.describe() == expected
    assert (p.epoch, p.model_fingerprint, p.n_layers) == (3, "fp", footprint.n_layers)


def test_plan_helpers() -> None:
    p = plan(nodes(a=100, b=200), fp(30))
    assert p.nodes == ("a", "b")
    assert p.layer_counts == (10, 20)
    assert (p.stage_of("a"), p.stage_of("b"), p.stage_of("zzz")) == (0, 1, None)
    assert p.stages[1] == StageAssignment("b", 10, 30)


@pytest.mark.parametrize(
    "stages",
    [
        (),
        (StageAssignment("a", 1, 30),),
        (StageAssignment("a", 0, 10), StageAssignment("b", 11, 30)),
        (StageAssignment("a", 0, 10), StageAssignment("b", 10, 29)),
        (StageAssignment("a", 0, 10), StageAssignment("a", 10, 30)),
        (StageAssignment("a", 0, 0), StageAssignment("b", 0, 30)),
    ],
)
def test_plan_rejects_malformed_stages(stages: tuple[StageAssignment, ...]) -> None:
    with pytest.raises(ValueError):
        Plan(epoch=0, model_fingerprint="x", n_layers=30, stages=stages)


def test_rebalance_moves_layers_to_nodes_with_room() -> None:
    # 1:1 memory, but the last stage also holds an untied head of 40: it can hold only 12 layers of 5.
    p = plan(nodes(a=100, b=100), fp(30, per_layer=5, head=40))
    assert p.layer_counts == (18, 12)
    for i, st_ in enumerate(p.stages):
        assert fp(30, per_layer=5, head=40).stage_bytes(i, 2, st_.n_layers) <= 100


def test_refuses_when_total_memory_is_insufficient_and_names_every_node() -> None:
    with pytest.raises(PlacementError) as err:
        plan(nodes(alpha=3 * GIB, beta=2 * GIB), fp(32, per_layer=GIB // 4, embed=GIB))
    msg = str(err.value)
    assert "alpha" in msg and "beta" in msg
    assert "3.00 GiB" in msg and "2.00 GiB" in msg
    assert "needs" in msg and "too little memory" in msg


def test_refuses_a_node_that_cannot_hold_one_layer() -> None:
    with pytest.raises(PlacementError, match=r"cannot hold even one layer[\s\S]*tiny: has 10 B"):
        plan(nodes(big=10_000, tiny=10), fp(4, per_layer=20))
    # leaving it out with max_stages makes the plan fit
    assert plan(nodes(big=10_000, tiny=10), fp(4, per_layer=20), max_stages=1).describe() == "big[0,4)"


def test_forced_split_is_checked_not_rebalanced() -> None:
    with pytest.raises(PlacementError, match=r"forced split does not fit[\s\S]*a: has 50 B, needs 60 B"):
        plan(nodes(a=50, b=500), fp(20, per_layer=5), split=[12, 8])
    assert plan(nodes(a=50, b=500), fp(20, per_layer=5)).describe() == "a[0,2) b[2,20)"


@pytest.mark.parametrize(
    ("ns", "kw"),
    [
        (nodes(a=1, b=1), {"split": [10]}),
        (nodes(a=1, b=1), {"split": [10, 10, 10]}),
        (nodes(a=1, b=1), {"split": [31, -1]}),
        (nodes(a=1, b=1), {"split": [0, 30]}),
        (nodes(a=1, b=1), {"split": [10, 10]}),
        (nodes(a=1, b=1), {"order": ["a"]}),
        (nodes(a=1, b=1), {"order": ["a", "a"]}),
        (nodes(a=1, b=1), {"order": ["a", "c"]}),
        (nodes(a=1, b=1), {"max_stages": 0}),
        ([NodeResources("a", 1), NodeResources("a", 2)], {}),
        ([NodeResources("a", -1)], {}),
    ],
)
def test_malformed_arguments(ns: list[NodeResources], kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        plan(ns, fp(30), **kw)


def test_no_nodes_is_a_placement_error() -> None:
    with pytest.raises(PlacementError, match="no nodes"):
        plan([], fp(30))


def test_footprint_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        fp(0)
    with pytest.raises(ValueError):
        fp(10, per_layer=-1)


def test_footprint_from_spec_smollm2() -> None:
    spec = ModelSpec(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        vocab_size=49152,
    )
    f = footprint_from_spec(spec, 2.0)
    head_dim = 64
    layer = 576 * 576 * 2 + 2 * 576 * 3 * head_dim + 3 * 576 * 1536 + 2 * 576
    assert f.n_layers == 30
    assert f.bytes_per_layer == 2 * layer
    assert f.embed_bytes == 2 * 49152 * 576
    assert f.head_bytes == 0  # tied
    # SmolLM2-135M: about 135M parameters in all
    assert 130e6 < (30 * layer + 49152 * 576) < 140e6
    untied = footprint_from_spec(
        ModelSpec(**_fields(spec), tie_word_embeddings=False),  # type: ignore[arg-type]
        0.5,
        kv_tokens=1024,
        kv_bytes_per_value=2,
    )
    assert untied.head_bytes == untied.embed_bytes == 49152 * 576 // 2
    assert untied.kv_bytes_per_layer_reserve == 2 * 3 * 64 * 1024 * 2


def _fields(spec: ModelSpec) -> dict[str, object]:
    return {k: getattr(spec, k) for k in spec.__struct_fields__ if k != "tie_word_embeddings"}


# ---------------------------------------------------------------------------------------------- properties

node_ids = st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=8)
memberships = st.dictionaries(node_ids, st.integers(min_value=1, max_value=10_000), min_size=1, max_size=9)


def _check_shape(p: Plan, n_layers: int) -> None:
    assert p.stages[0].start == 0 and p.stages[-1].end == n_layers
    for a, b in zip(p.stages, p.stages[1:], strict=False):
        assert a.end == b.start
    assert all(s.n_layers >= 1 for s in p.stages)
    covered = [layer for s in p.stages for layer in range(s.start, s.end)]
    assert covered == list(range(n_layers))


@settings(max_examples=200, deadline=None)
@given(memberships, st.integers(min_value=1, max_value=80), st.randoms(use_true_random=False))
def test_plentiful_memory_properties(memory: dict[str, int], n_layers: int, rnd: random.Random) -> None:
    ns = [NodeResources(k, v * 1000) for k, v in memory.items()]  # every node could hold the whole model
    footprint = fp(n_layers, per_layer=1)
    p = plan(ns, footprint)
    _check_shape(p, n_layers)
    assert len(p.stages) == min(len(ns), n_layers)
    used = [n for n in ns if n.node_id in p.nodes]
    assert list(p.nodes) == sorted(p.nodes)
    shuffled = list(ns)
    rnd.shuffle(shuffled)
    assert plan(shuffled, footprint) == p
    # proportional: within one layer of the ideal share when every ideal share is at least one layer
    total = sum(n.memory_bytes for n in used)
    ideal = {n.node_id: n_layers * n.memory_bytes / total for n in used}
    if all(v >= 1 for v in ideal.values()):
        for s in p.stages:
            assert abs(s.n_layers - ideal[s.node_id]) < 1


@settings(max_examples=200, deadline=None)
@given(
    memberships,
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=0, max_value=200),
    st.booleans(),
)
def test_fit_or_refuse(memory: dict[str, int], n_layers: int, per_layer: int, embed: int, tied: bool) -> None:
    ns = [NodeResources(k, v) for k, v in memory.items()]
    footprint = fp(n_layers, per_layer=per_layer, embed=embed, head=0 if tied else embed)
    k = min(len(ns), n_layers)
    try:
        p = plan(ns, footprint)
    except PlacementError as err:
        for n in sorted(ns, key=lambda n: (-n.memory_bytes, n.node_id))[:k]:
            assert n.node_id in str(err)
        used = sorted(ns, key=lambda n: (-n.memory_bytes, n.node_id))[:k]
        # refused only when no assignment of at least one layer each could fit these nodes in this order
        caps = [
            (n.memory_bytes - footprint.fixed_bytes(i, k)) // per_layer
            for i, n in enumerate(sorted(used, key=lambda n: n.node_id))
        ]
        assert min(caps) < 1 or sum(caps) < n_layers
        return
    _check_shape(p, n_layers)
    by_id = {n.node_id: n.memory_bytes for n in ns}
    for i, s in enumerate(p.stages):
        assert footprint.stage_bytes(i, len(p.stages), s.n_layers) <= by_id[s.node_id]


@settings(max_examples=100, deadline=None)
@given(memberships, st.integers(min_value=1, max_value=40))
def test_refuses_when_total_memory_is_insufficient(memory: dict[str, int], n_layers: int) -> None:
    ns = [NodeResources(k, v) for k, v in memory.items()]
    total = sum(memory.values())
    per_layer = total // n_layers + 1  # all layers together need more than all the memory
    with pytest.raises(PlacementError):
        plan(ns, fp(n_layers, per_layer=per_layer))


@settings(max_examples=100, deadline=None)
@given(memberships, st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=9))
def test_max_stages_respected(memory: dict[str, int], n_layers: int, max_stages: int) -> None:
    ns = [NodeResources(k, v * 1000) for k, v in memory.items()]
    p = plan(ns, fp(n_layers), max_stages=max_stages)
    _check_shape(p, n_layers)
    assert len(p.stages) == min(len(ns), n_layers, max_stages)
    # the used nodes have at least as much memory as every unused one
    used = {n.memory_bytes for n in ns if n.node_id in p.nodes}
    unused = {n.memory_bytes for n in ns if n.node_id not in p.nodes}
    assert not unused or min(used) >= max(unused)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_split_respected(data: st.DataObject) -> None:
    memory = data.draw(memberships)
    k = len(memory)
    counts = data.draw(st.lists(st.integers(min_value=1, max_value=10), min_size=k, max_size=k))
    ns = [NodeResources(key, 10**6) for key in memory]
    p = plan(ns, fp(sum(counts)), split=counts)
    _check_shape(p, sum(counts))
    assert list(p.layer_counts) == counts
    assert list(p.nodes) == sorted(memory)


@settings(max_examples=100, deadline=None)
@given(memberships, st.integers(min_value=1, max_value=40), st.randoms(use_true_random=False))
def test_order_respected(memory: dict[str, int], n_layers: int, rnd: random.Random) -> None:
    ids = list(memory)
    rnd.shuffle(ids)
    ns = [NodeResources(k, v * 1000) for k, v in memory.items()]
    p = plan(ns, fp(n_layers), order=ids)
    _check_shape(p, n_layers)
    assert list(p.nodes) == [i for i in ids if i in p.nodes]


def test_epoch_must_be_non_negative() -> None:
    with pytest.raises(ValueError):
        plan_placement(nodes(a=10), fp(3), epoch=-1, model_fingerprint="x")


def test_tied_head_needs_a_copy_of_the_embeddings_on_the_last_stage() -> None:
    tied = fp(30, per_layer=5, embed=30)
    assert [tied.fixed_bytes(i, 2) for i in range(2)] == [30, 30]
    assert tied.fixed_bytes(0, 1) == 30  # one stage holds the table once
    assert [fp(30, embed=30, head=40).fixed_bytes(i, 3) for i in range(3)] == [30, 0, 40]
    # each node holds 14 layers beside its table: 28 < 30
    with pytest.raises(PlacementError, match="too little memory"):
        plan(nodes(a=100, b=100), tied)
    assert plan(nodes(solo=180), tied).describe() == "solo[0,30)"
    with pytest.raises(PlacementError):
        plan(nodes(solo=179), tied)


def test_rebalance_spreads_the_overflow_closest_to_proportional() -> None:
    # 10/10/10 proportional, but c (with an untied head of 60) holds only 8: a and b take one each
    assert plan(nodes(a=100, b=100, c=100), fp(30, per_layer=5, head=60)).describe() == "a[0,11) b[11,22) c[22,30)"
    # the overflow spreads in proportion to memory: b has twice a's memory and takes 3 of the 5
    assert plan(nodes(a=100, b=200, c=100), fp(40, per_layer=2, head=90)).describe() == "a[0,12) b[12,35) c[35,40)"


# ---------------------------------------------------------------------------------------------- sticky re-plans


def stages(text: str) -> tuple[StageAssignment, ...]:
    """``"a[0,10) b[10,30)"`` as stages."""
    out = []
    for part in text.split():
        node, rest = part.split("[")
        start, end = rest.rstrip(")").split(",")
        out.append(StageAssignment(node, int(start), int(end)))
    return tuple(out)


@pytest.mark.parametrize(
    ("memory", "previous", "expected"),
    [
        # the last stage left: the one before takes its layers; the first keeps its range
        ({"a": 100, "b": 100}, "a[0,10) b[10,20) c[20,30)", "a[0,10) b[10,30)"),
        # the first stage left: the next one takes its layers
        ({"b": 100, "c": 100}, "a[0,10) b[10,20) c[20,30)", "b[0,20) c[20,30)"),
        # a middle stage left: its neighbours split its layers, the first half to the one before
        ({"a": 100, "c": 100}, "a[0,10) b[10,20) c[20,30)", "a[0,15) c[15,30)"),
        ({"a": 100, "c": 100}, "a[0,10) b[10,19) c[19,30)", "a[0,15) c[15,30)"),
        # two neighbouring stages left: their layers together, split between the survivors around them
        ({"a": 100, "d": 100}, "a[0,5) b[5,10) c[10,20) d[20,30)", "a[0,13) d[13,30)"),
        # only one survivor: it takes everything
        ({"b": 100}, "a[0,10) b[10,20) c[20,30)", "b[0,30)"),
        # nobody left: the plan in force stays, even where a fresh plan would balance it
        ({"a": 100, "b": 100}, "a[0,10) b[10,30)", "a[0,10) b[10,30)"),
        # the survivors keep the previous pipeline order
        ({"a": 100, "b": 100}, "b[0,10) c[10,20) a[20,30)", "b[0,15) a[15,30)"),
        # a node joined: a fresh plan by memory
        ({"a": 100, "b": 100, "c": 100, "d": 300}, "a[0,10) b[10,20) c[20,30)", "a[0,5) b[5,10) c[10,15) d[15,30)"),
        # the sticky plan does not fit b (20 layers > 15): a fresh plan by memory
        ({"a": 100, "b": 15}, "a[0,10) b[10,20) c[20,30)", "a[0,26) b[26,30)"),
        # another model (the previous plan covers another layer count): a fresh plan
        ({"a": 100, "b": 100}, "a[0,5) b[5,10)", "a[0,15) b[15,30)"),
    ],
)
def test_sticky_replan_extends_neighbours(memory: dict[str, int], previous: str, expected: str) -> None:
    p = plan(nodes(**memory), fp(30), previous=stages(previous))
    assert p.describe() == expected


def test_sticky_replan_ignores_a_forced_split() -> None:
    p = plan(nodes(a=100, b=100), fp(30), split=[20, 10], previous=stages("a[0,10) b[10,20) c[20,30)"))
    assert p.describe() == "a[0,20) b[20,30)"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(node_ids, min_size=1, max_size=8, unique=True),
    st.integers(min_value=1, max_value=60),
    st.data(),
)
def test_sticky_replan_properties(ids: list[str], n_layers: int, data: st.DataObject) -> None:
    """A re-plan after stages leave keeps every survivor's old layers (its range only grows), covers the
    model, gives the departed layers only to survivors, and is the same whatever order the nodes come in."""
    k = min(len(ids), n_layers)
    previous = plan([NodeResources(i, 1000) for i in ids], fp(n_layers, per_layer=1)).stages
    assert len(previous) == k
    gone = data.draw(st.sets(st.sampled_from([s.node_id for s in previous]), max_size=k - 1))
    survivors = [NodeResources(s.node_id, 1000) for s in previous if s.node_id not in gone]
    p = plan(survivors, fp(n_layers, per_layer=1), previous=previous)
    _check_shape(p, n_layers)
    assert p.nodes == tuple(s.node_id for s in previous if s.node_id not in gone)
    old = {s.node_id: s for s in previous}
    for s in p.stages:
        assert s.start <= old[s.node_id].start and old[s.node_id].end <= s.end
    shuffled = data.draw(st.permutations(survivors))
    assert plan(list(shuffled), fp(n_layers, per_layer=1), previous=previous) == p
