"""Several machines, as network namespaces on one bridge: real node processes bound to ``0.0.0.0``.

Each test starts three ``exo-stable serve`` processes, node i in namespace i at 10.77.0.{i+1}, and checks
an answer streamed through one of them against the same cluster's uninterrupted answer. The faults are
real: SIGKILL, and a link pulled (the switch side of the node's veth down) mid-stream, then healed.
Skips, with the reason, only where namespaces cannot be created.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import PORT, Cluster, Fabric, NsNode, Stream, fabric_fixture, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""), pytest.mark.timeout(300)]

SECRET = "netns-test-secret"
TINY = ("--model", "random:tiny", "--dtype", "float32")
PLAN_TIMEOUT_S = 120.0
FAST = ("--suspect-seconds", "4")
BODY: dict[str, Any] = {
    "model": "default",
    "messages": [{"role": "user", "content": "Tell me a long story about the sea and its ships."}],
    "max_tokens": 96,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    yield from fabric_fixture(3)


def _seeded(fabric: Fabric, *extra: str) -> list[tuple[str, ...]]:
    """Node 0 alone; nodes 1 and 2 told only about node 0 (the README's recipe without multicast)."""
    base = ("--cluster-secret", SECRET, "--no-discovery", *extra)
    seed = ("--peers", f"{fabric.addr(0)}:{PORT}")
    return [base, (*base, *seed), (*base, *seed)]


def _answer(fabric: Fabric, node: int, body: dict[str, Any] = BODY) -> str:
    stream = Stream(fabric, node, body)
    try:
        result = stream.result(timeout_s=120)
    finally:
        stream.close()
    assert result.get("done"), result
    text: str = result["text"]
    assert text, result
    return text


def _ready(cluster: Cluster, ids: list[str] | None = None, nodes: list[int] | None = None) -> list[dict[str, Any]]:
    try:
        return cluster.fabric.wait_plan(ids or cluster.ids, nodes or [0, 1, 2], PLAN_TIMEOUT_S)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from exc


def test_join_through_one_seed_peer_and_a_short_freeze_is_no_failure(fabric: Fabric, tmp_path: Path) -> None:
    """Nodes 1 and 2 know only node 0's address: gossip must give them each other's dialable addresses.
    Then node 2 is frozen (SIGSTOP) for 1 s with --peer-timeout 3: slow but alive is no failure (no re-plan,
    the same answer)."""
    per_node = [(*a, *TINY, "--peer-timeout", "3") for a in _seeded(fabric)]
    with Cluster.start(fabric, tmp_path, per_node) as cluster:
        views = _ready(cluster)
        for view in views:
            shown = {n["id"]: n["addresses"] for n in view["nodes"]}
            for i, node_id in enumerate(cluster.ids):
                assert shown[node_id][0] == f"{fabric.addr(i)}:{PORT}", view
                assert not any(a.startswith(("0.0.0.0", "[::]")) for a in shown[node_id]), view
        expected = _answer(fabric, 1)
        assert _answer(fabric, 2) == expected
        victim = cluster.nodes[2]

        def freeze() -> None:
            victim.kill(signal.SIGSTOP)
            try:
                time.sleep(1.0)  # the fault itself: the node is frozen this long
            finally:
                victim.kill(signal.SIGCONT)

        _stream_through_fault(fabric, 1, expected, freeze)
        status, after = fabric.get(f"{fabric.url(0)}/v1/cluster")
        before = views[0]["plan"]
        assert status == 200 and after["plan"]["epoch"] == before["epoch"], (before, after["plan"])


def test_join_by_zeroconf(fabric: Fabric, tmp_path: Path) -> None:
    args = ("--cluster-secret", SECRET, "--discovery", *TINY)
    with Cluster.start(fabric, tmp_path, [args] * 3) as cluster:
        _ready(cluster)
        assert _answer(fabric, 0)


def _stream_through_fault(fabric: Fabric, node: int, expected: str, fault: Any, body: dict[str, Any] = BODY) -> float:
    stream = Stream(fabric, node, body)
    try:
        stream.wait_deltas(8, timeout_s=60)
        fault()
        result = stream.result(timeout_s=120)
    finally:
        stream.close()
    assert result.get("done"), result
    assert result["text"] == expected, (result["text"], expected)
    return stream.stall_s()


def test_stage_killed_mid_stream_then_back_with_the_same_id(fabric: Fabric, tmp_path: Path) -> None:
    with Cluster.start(fabric, tmp_path, [(*a, *TINY) for a in _seeded(fabric, *FAST)]) as cluster:
        _ready(cluster)
        expected = _answer(fabric, 0)
        victim = cluster.nodes[2]
        _stream_through_fault(fabric, 0, expected, lambda: victim.kill(signal.SIGKILL))
        _ready(cluster, cluster.ids[:2], [0, 1])
        assert _answer(fabric, 1) == expected
        victim.start()  # the same node id, a fresh process
        _ready(cluster)
        assert _answer(fabric, 2) == expected


def test_stage_partitioned_mid_stream_and_healed(fabric: Fabric, tmp_path: Path) -> None:
    """On the default model (SmolLM2): the middle stage's link goes down mid-answer, then comes back."""
    body = BODY | {"max_tokens": 40}  # SmolLM2 on three shared cores: about 10 tokens/s
    with Cluster.start(fabric, tmp_path, _seeded(fabric, *FAST)) as cluster:
        _ready(cluster)
        expected = _answer(fabric, 0, body)
        try:
            _stream_through_fault(fabric, 0, expected, lambda: fabric.partition(1), body)
        finally:
            fabric.heal(1)
        _ready(cluster)
        assert _answer(fabric, 1, body) == expected


def test_leader_partitioned_mid_stream(fabric: Fabric, tmp_path: Path) -> None:
    """Node 0 leads (smallest id) and is a stage; a request owned by node 1 goes on without it."""
    with Cluster.start(fabric, tmp_path, [(*a, *TINY) for a in _seeded(fabric, *FAST)]) as cluster:
        _ready(cluster)
        expected = _answer(fabric, 1)
        try:
            _stream_through_fault(fabric, 1, expected, lambda: fabric.partition(0))
            assert _answer(fabric, 2) == expected
        finally:
            fabric.heal(0)
        _ready(cluster)
        assert _answer(fabric, 0) == expected


def test_ipv6_only_nodes_join_through_a_bracketed_seed(fabric: Fabric, tmp_path: Path) -> None:
    """Bound to ``::`` and joined through ``[fd77::1]:52415``: the nodes advertise and dial IPv6 addresses."""
    base = ("--cluster-secret", SECRET, "--no-discovery", *TINY)
    prefix = f"v6{secrets.token_hex(2)}n"
    nodes = [
        NsNode(fabric, 0, f"{prefix}0", base, tmp_path / "v0.log", host="::"),
        NsNode(
            fabric, 1, f"{prefix}1", (*base, "--peers", f"[{fabric.addr6(0)}]:{PORT}"), tmp_path / "v1.log", host="::"
        ),
    ]
    try:
        for node in nodes:
            node.start()
        try:
            views = fabric.wait_plan([n.node_id for n in nodes], [0, 1], PLAN_TIMEOUT_S, v6=True)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{nodes[0].log()}\n{nodes[1].log()}") from exc
        shown = {n["id"]: n["addresses"] for n in views[0]["nodes"]}
        assert f"[{fabric.addr6(1)}]:{PORT}" in shown[nodes[1].node_id], shown
        assert all(a.startswith("[fd77::") for addrs in shown.values() for a in addrs), shown
        stream = Stream(fabric, 1, BODY, v6=True)
        try:
            assert stream.result(timeout_s=120).get("done")
        finally:
            stream.close()
    finally:
        for node in nodes:
            node.stop()
